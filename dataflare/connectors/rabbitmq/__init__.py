"""RabbitMQ source and sink (type `rabbitmq`), built on aio-pika.

See `source` and `sink` for examples, acknowledgements and delivery
guarantees, and docs/connectors-brokers.md for the configuration reference.
"""

from dataflare.connectors.rabbitmq.sink import RabbitMQSink, RabbitMQSinkConfig
from dataflare.connectors.rabbitmq.source import RabbitMQSource, RabbitMQSourceConfig

__all__ = [
    "RabbitMQSink",
    "RabbitMQSinkConfig",
    "RabbitMQSource",
    "RabbitMQSourceConfig",
]
