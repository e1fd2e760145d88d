"""Kafka source and sink (type `kafka`), built on confluent-kafka (librdkafka).

See `source` and `sink` for examples, offsets and delivery guarantees, and
docs/connectors-brokers.md for the configuration reference. `payloads`
contains the payload decoding and encoding that the NATS and Redis
connectors share.
"""

from dataflare.connectors.kafka.sink import KafkaSink, KafkaSinkConfig
from dataflare.connectors.kafka.source import KafkaSource, KafkaSourceConfig

__all__ = ["KafkaSink", "KafkaSinkConfig", "KafkaSource", "KafkaSourceConfig"]
