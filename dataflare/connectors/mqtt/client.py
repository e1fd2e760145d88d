"""Connection settings and the client session of the MQTT source and sink.

`MqttSession` wraps a paho-mqtt client (MQTT 3.1.1, QoS 1) whose network
traffic runs on an I/O thread of its own, so keepalive pings go on while the
plugin's thread is blocked by backpressure. When the connection ends, the
I/O thread connects again with `reconnecting()` (exponential backoff, each
retry logged at WARNING) until `reconnect_for` has passed. The plugin gets
the error only if the broker stays away that long.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

from dataflare.connectors.common import SecretRef, reconnecting
from dataflare.plugin.interface import PluginConfig
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

QOS = 1
"""Every message is sent and received with QoS 1 (at least once)."""

_LOOP_SECONDS = 0.1
_FLUSH_SECONDS = 5.0


class MqttConnectionConfig(PluginConfig):
    """Broker address and login settings."""

    host: str = Field("127.0.0.1", description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="MQTT port")
    username: str | None = Field(None, description="User name, if the broker asks")
    password: SecretRef | None = Field(
        None, description="Password, as {env: VAR} or {file: PATH}"
    )
    keepalive: Duration = Field(
        timedelta(seconds=30), description="Keepalive interval sent to the broker"
    )
    connect_timeout: Duration = Field(
        timedelta(seconds=10), description="Time allowed for the broker's CONNACK"
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep trying to reach the broker before the step fails",
    )
    reconnect_max_wait: Duration = Field(
        timedelta(seconds=5), description="Maximum pause between two attempts"
    )

    @model_validator(mode="after")
    def _password_needs_username(self) -> MqttConnectionConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not; set username")
        return self

    def address(self) -> str:
        """Return `mqtt://host:port`, for messages (no credentials)."""
        return f"mqtt://{self.host}:{self.port}"


class MqttRefused(ConnectionError):
    """The broker rejected the connection with an error code in its CONNACK."""


MessageHandler = Callable[[int, mqtt.MQTTMessage], None]


def _no_op(*args: Any) -> None:
    pass


class MqttSession:
    """A paho client with its own I/O thread and reconnection.

    Args:
        config: Connection settings.
        client_id: The MQTT client id; the broker keeps a persistent session
            under it when `clean_session` is false.
        clean_session: False to keep subscriptions and undelivered QoS 1
            messages at the broker while the client is away.
        step: The step id, for log lines.
        topics: Topic filters to subscribe to (QoS 1) on every connection.
        on_message: Called on the I/O thread with the connection number and
            each message; messages are then acknowledged with `ack()`.
        on_publish: Called on the I/O thread with the message id of each
            published message the broker acknowledged.
        max_in_flight: Maximum QoS 1 messages published and not yet
            acknowledged by the broker.
    """

    def __init__(
        self,
        config: MqttConnectionConfig,
        client_id: str,
        *,
        clean_session: bool,
        step: str,
        topics: list[str] | None = None,
        on_message: MessageHandler | None = None,
        on_publish: Callable[[int], None] | None = None,
        max_in_flight: int = 20,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.step = step
        self.topics = list(topics or [])
        self.generation = 0  # connections made; messages carry theirs
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the SUBACK of this connection came
        self.failure: BaseException | None = None
        self._closing = threading.Event()
        self._socket_open = False
        self._thread: threading.Thread | None = None
        self._on_message = on_message
        self._on_publish = on_publish

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=on_message is not None,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(max_in_flight)
        client.max_queued_messages_set(0)
        # Writes happen on the I/O thread only: with a write callback set,
        # paho queues packets from other threads (publish, ack) and wakes the
        # I/O thread instead of writing to the socket itself.
        client.on_socket_register_write = _no_op
        client.on_socket_unregister_write = _no_op
        client.on_connect = self._handle_connect
        client.on_subscribe = self._handle_subscribe
        client.on_disconnect = self._handle_disconnect
        if on_message is not None:
            client.on_message = self._handle_message
        if on_publish is not None:
            client.on_publish = self._handle_publish
        self.client = client

    # --- starting and stopping ---

    def start(self, should_stop: Callable[[], bool]) -> None:
        """Connect (retrying while the broker is unreachable), then serve.

        Raises:
            MqttRefused: the broker refused the client (for example a wrong
                password); the message gives the broker's reason.
            ValueError: the password's secret cannot be read.
            OSError: the broker stayed unreachable for `reconnect_for`.
        """
        if self.config.username is not None:
            password = self.config.password.reveal() if self.config.password else None
            self.client.username_pw_set(self.config.username, password)
        self._retry_connect(should_stop)
        self._thread = threading.Thread(
            target=self._serve, name=f"{self.step}-mqtt", daemon=True
        )
        self._thread.start()
        timeout = self.config.connect_timeout.total_seconds()
        if not self.connected.wait(timeout):
            self.raise_failure()
            raise TimeoutError(
                f"the MQTT broker at {self.config.address()} accepted the "
                f"connection but sent no CONNACK within {timeout:g} s; check that "
                "it is an MQTT broker"
            )
        self.raise_failure()
        # Messages published before the SUBACK may not reach a new session.
        if self.topics and not self.subscribed.wait(timeout):
            self.raise_failure()
            raise TimeoutError(
                f"the MQTT broker at {self.config.address()} sent no SUBACK for "
                f"{', '.join(self.topics)} within {timeout:g} s"
            )
        self.raise_failure()

    def close(self) -> None:
        """Stop the I/O thread, make sure the broker has the acknowledgements
        sent so far, and disconnect."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket_open and self.connected.is_set():
            try:
                self._settle()
                self.client.disconnect()
                self._pump(lambda: not self.client.want_write())
            except (OSError, ValueError) as exc:
                logger.debug("disconnecting from the MQTT broker failed: %s", exc)
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _settle(self) -> None:
        """Wait until the broker has read every packet sent so far.

        The broker handles a client's packets in order, so its UNSUBACK for an
        UNSUBSCRIBE sent last (for a topic this client never subscribed to)
        means it has read the acknowledgements before it. Without this,
        closing the socket while data from the broker is still unread resets
        the connection, and the broker may drop acknowledgements it had not
        read yet (seen with Mosquitto 2.0).
        """
        answered = threading.Event()
        self.client.on_unsubscribe = lambda *args: answered.set()
        self.client.unsubscribe(f"dataflare/settle/{uuid.uuid4().hex}")
        self._pump(answered.is_set)

    def _pump(self, done: Callable[[], bool]) -> None:
        """Run the network loop on this thread until `done()`, for a while."""
        deadline = time.monotonic() + _FLUSH_SECONDS
        while not done() and time.monotonic() < deadline:
            if (
                self.client.loop(timeout=_LOOP_SECONDS)
                != MQTTErrorCode.MQTT_ERR_SUCCESS
            ):
                return

    def raise_failure(self) -> None:
        """Raise the error that stopped the I/O thread, if any."""
        if self.failure is not None:
            raise self.failure

    # --- the I/O thread ---

    def _retry_connect(self, should_stop: Callable[[], bool]) -> None:
        reconnecting(
            self._connect_once,
            step=self.step,
            what=f"connect to the MQTT broker at {self.config.address()}",
            errors=(OSError,),
            give_up_after=self.config.reconnect_for.total_seconds(),
            max_wait=self.config.reconnect_max_wait.total_seconds(),
            should_stop=should_stop,
        )

    def _connect_once(self) -> None:
        keepalive = max(1, round(self.config.keepalive.total_seconds()))
        if self.generation == 0 and not self._socket_open:
            self.client.connect(self.config.host, self.config.port, keepalive)
        else:
            self.client.reconnect()
        self._socket_open = True

    def _serve(self) -> None:
        while not self._closing.is_set():
            if not self._socket_open:
                try:
                    self._retry_connect(self._closing.is_set)
                except BaseException as exc:
                    if not self._closing.is_set():
                        self.failure = exc
                        self.connected.set()  # wake anyone waiting
                    return
                continue
            try:
                rc = self.client.loop(timeout=_LOOP_SECONDS)
            except (OSError, ValueError) as exc:
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                logger.debug("MQTT network loop failed: %s", exc)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not self._closing.is_set():
                if self.failure is not None:
                    return
                self._socket_open = False
                self.connected.clear()
                logger.warning(
                    "step %r: lost the connection to the MQTT broker at %s (%s); "
                    "reconnecting",
                    self.step,
                    self.config.address(),
                    mqtt.error_string(rc),
                )

    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self.failure = MqttRefused(
                f"the MQTT broker at {self.config.address()} refused client "
                f"{self.client_id!r}: {reason}; check username and password, "
                "and that the client id is allowed"
            )
            self._closing.set()
            self.connected.set()
            return
        self.generation += 1
        if self.topics:
            self.subscribed.clear()
            client.subscribe([(topic, QOS) for topic in self.topics])
        logger.info(
            "step %r: connected to the MQTT broker at %s as %r (%s)",
            self.step,
            self.config.address(),
            self.client_id,
            "session resumed" if flags.session_present else "new session",
        )
        self.connected.set()

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Any,
    ) -> None:
        rejected = [
            f"{topic} ({reason})"
            for topic, reason in zip(self.topics, reasons, strict=False)
            if reason.is_failure
        ]
        if rejected:
            self.failure = MqttRefused(
                f"the MQTT broker at {self.config.address()} rejected the "
                f"subscription of client {self.client_id!r} to "
                f"{', '.join(rejected)}; check the topic filters and the "
                "broker's access rules"
            )
            self._closing.set()
        self.subscribed.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self.connected.clear()

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        assert self._on_message is not None
        self._on_message(self.generation, message)

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        assert self._on_publish is not None
        self._on_publish(mid)
