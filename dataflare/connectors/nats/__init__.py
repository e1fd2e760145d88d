"""NATS JetStream source and sink (type `nats`), built on nats-py.

See `source` and `sink` for examples, acknowledgements and deduplication,
and docs/connectors-brokers.md for the configuration reference.
"""

from dataflare.connectors.nats.sink import NatsSink, NatsSinkConfig
from dataflare.connectors.nats.source import NatsSource, NatsSourceConfig

__all__ = ["NatsSink", "NatsSinkConfig", "NatsSource", "NatsSourceConfig"]
