"""The MQTT sink: one JSON message per record, QoS 1.

Example::

    destinations:
      alerts:
        type: mqtt
        inputs: [hot]
        config: {topic: alerts/temperature}

`write()` publishes every record of the batch with QoS 1 and returns once
the broker has acknowledged each message (PUBACK). Messages in flight when
the connection ends are kept by the client and sent again, flagged as
duplicates, once it has reconnected, so a message may arrive twice: at
least once.
"""

from __future__ import annotations

import threading
import uuid

import pyarrow as pa
from paho.mqtt.enums import MQTTErrorCode
from pydantic import Field

from dataflare.connectors.http.records import encode_records
from dataflare.connectors.mqtt.client import QOS, MqttConnectionConfig, MqttSession
from dataflare.plugin.interface import (
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)

_WAIT_SECONDS = 0.2
_QUEUED = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
"""Results of `publish` for a message the client sends (now or on reconnecting)."""


class MqttSinkConfig(MqttConnectionConfig, SinkConfig):
    topic: str = Field(min_length=1, description="Topic to publish to (no wildcards)")
    retain: bool = Field(False, description="Ask the broker to retain each message")
    client_id: str | None = Field(
        None, description="Client id; a unique one is made when unset"
    )
    max_in_flight: int = Field(
        1_000,
        ge=1,
        le=30_000,
        description="Messages published before waiting for the broker's "
        "acknowledgements",
    )


class MqttSink(Sink[MqttSinkConfig]):
    """Publish each record as a JSON message with QoS 1."""

    metadata = PluginMetadata(
        "mqtt", PluginKind.SINK, "JSON messages to an MQTT topic (QoS 1)"
    )
    Config = MqttSinkConfig

    def __init__(self, config: MqttSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        if "+" in config.topic or "#" in config.topic:
            raise ValueError(
                f"topic {config.topic!r} contains a wildcard (+ or #); "
                "publish to a topic name without them"
            )
        self._session: MqttSession | None = None
        self._confirmed: set[int] = set()
        self._confirmed_changed = threading.Condition()

    def open(self) -> None:
        client_id = (
            self.config.client_id
            or f"dataflare-{self.context.step}-{uuid.uuid4().hex[:12]}"
        )
        self._session = MqttSession(
            self.config,
            client_id,
            clean_session=True,
            step=self.context.step,
            on_publish=self._on_publish,
            max_in_flight=self.config.max_in_flight,
        )
        self._session.start(lambda: False)

    def _on_publish(self, mid: int) -> None:
        with self._confirmed_changed:
            self._confirmed.add(mid)
            self._confirmed_changed.notify_all()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def write(self, batch: pa.RecordBatch) -> None:
        payloads = encode_records(batch)
        step = self.config.max_in_flight
        for start in range(0, len(payloads), step):
            self._publish(payloads[start : start + step])

    def _publish(self, payloads: list[bytes]) -> None:
        """Publish `payloads` and wait until the broker acknowledged them all.

        Raises:
            OSError: the broker stayed unreachable for `reconnect_for`.
            MqttRefused: the broker refused the client on reconnecting.
        """
        session = self._session
        assert session is not None
        with self._confirmed_changed:
            self._confirmed.clear()
        waiting = set()
        for payload in payloads:
            info = session.client.publish(
                self.config.topic, payload, qos=QOS, retain=self.config.retain
            )
            if info.rc not in (
                MQTTErrorCode.MQTT_ERR_SUCCESS,
                MQTTErrorCode.MQTT_ERR_NO_CONN,
            ):
                raise OSError(
                    f"cannot publish to MQTT topic {self.config.topic!r} on "
                    f"{self.config.address()}: {info.rc.name}"
                )
            # Without a connection the client keeps the message and sends it
            # after reconnecting.
            waiting.add(info.mid)
        with self._confirmed_changed:
            while not waiting <= self._confirmed:
                session.raise_failure()
                self._confirmed_changed.wait(_WAIT_SECONDS)

    def info(self) -> SinkInfo:
        return SinkInfo(
            paths=[f"{self.config.address()} topic {self.config.topic}"],
            delivery="at-least-once",
        )
