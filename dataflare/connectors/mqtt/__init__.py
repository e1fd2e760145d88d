"""MQTT source and sink (type `mqtt`), built on paho-mqtt.

See `source` and `sink` for examples, acknowledgements and delivery
guarantees, and docs/connectors-brokers.md for the configuration reference.
"""

from dataflare.connectors.mqtt.sink import MqttSink, MqttSinkConfig
from dataflare.connectors.mqtt.source import MqttSource, MqttSourceConfig

__all__ = ["MqttSink", "MqttSinkConfig", "MqttSource", "MqttSourceConfig"]
