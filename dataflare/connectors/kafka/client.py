"""Connection settings and error reporting shared by the Kafka source and sink.

Both are built on confluent-kafka (librdkafka). librdkafka reconnects to
brokers by itself, with exponential backoff from `reconnect.backoff.ms`
(100 ms) up to `reconnect.backoff.max.ms` (5 s, set here). `ErrorReporter`
logs when the connection is lost and when data flows again, so an outage
shows in the log as two lines, not as a line per attempt.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal

from confluent_kafka import KafkaError
from pydantic import Field, field_validator

from dataflare.connectors.common import SecretRef
from dataflare.plugin.interface import PluginConfig
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

_SECRET_OPTIONS = (
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
)
_CONNECTION_ERRORS = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
    }
)
MAX_BACKOFF_MS = 5000


class KafkaConnectionConfig(PluginConfig):
    """Broker addresses and login settings of a Kafka cluster."""

    bootstrap_servers: str | list[str] = Field(
        description="host:port of one or more brokers, e.g. 127.0.0.1:9092"
    )
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = (
        Field("plaintext", description="How to connect to the brokers")
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism, with a sasl_* security_protocol"
    )
    username: str | None = Field(None, description="SASL user name")
    password: SecretRef | None = Field(
        None, description="SASL password, by reference: {env: VAR} or {file: PATH}"
    )
    ssl_ca_location: str | None = Field(
        None, description="CA certificate file that signs the brokers' certificates"
    )
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="More librdkafka settings, e.g. {client.id: etl}; "
        "secrets are not accepted here",
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep trying while the brokers are unreachable "
        "before the run fails",
    )

    @field_validator("options")
    @classmethod
    def _no_inline_secrets(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        for key in value:
            if key in _SECRET_OPTIONS:
                raise ValueError(
                    f"options.{key} would put a secret in the pipeline file; use "
                    "password: {env: VARIABLE} or password: {file: PATH} instead"
                )
        return value

    def servers(self) -> str:
        """Return the bootstrap servers as librdkafka's comma-separated list."""
        if isinstance(self.bootstrap_servers, str):
            return self.bootstrap_servers
        return ",".join(self.bootstrap_servers)

    def client_config(self) -> dict[str, Any]:
        """Return the librdkafka settings, the password revealed.

        Raises:
            ValueError: the password reference cannot be read.
        """
        settings: dict[str, Any] = {
            "bootstrap.servers": self.servers(),
            "security.protocol": self.security_protocol,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": MAX_BACKOFF_MS,
        }
        if self.sasl_mechanism is not None:
            settings["sasl.mechanism"] = self.sasl_mechanism
        if self.username is not None:
            settings["sasl.username"] = self.username
        if self.password is not None:
            settings["sasl.password"] = self.password.reveal()
        if self.ssl_ca_location is not None:
            settings["ssl.ca.location"] = self.ssl_ca_location
        settings.update(self.options)
        return settings


class LibrdkafkaLog:
    """The `logger` of a Kafka client: librdkafka's own log lines, at DEBUG.

    librdkafka logs every failed connection attempt at ERROR; the outage is
    reported once by `ErrorReporter` instead, so its lines go to DEBUG.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger(f"{__name__}.librdkafka")

    def log(self, level: int, message: str, *args: object) -> None:
        self._logger.debug(message, *args)


class ErrorReporter:
    """The `error_cb` of a Kafka client: logs outages once, and recovery.

    Args:
        step: The step id, for log lines.
        servers: The bootstrap servers, for log lines.
    """

    def __init__(self, step: str, servers: str) -> None:
        self.step = step
        self.servers = servers
        self.down = False
        self.fatal: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error
            logger.warning(
                "step %r: the Kafka client at %s hit a fatal error: %s",
                self.step,
                self.servers,
                error.str(),
            )
            return
        if error.code() in _CONNECTION_ERRORS:
            if not self.down:
                self.down = True
                logger.warning(
                    "step %r: lost the connection to Kafka at %s (%s); "
                    "reconnecting with backoff (at most %d ms between attempts)",
                    self.step,
                    self.servers,
                    error.str(),
                    MAX_BACKOFF_MS,
                )
            return
        logger.warning(
            "step %r: Kafka at %s reports: %s", self.step, self.servers, error.str()
        )

    def working(self) -> None:
        """Note that data flows again; logs the recovery after an outage."""
        if self.down:
            self.down = False
            logger.warning(
                "step %r: connected to Kafka at %s again", self.step, self.servers
            )
