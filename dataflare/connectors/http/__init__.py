"""HTTP source and sink (type `http`): an ingest endpoint and batched POSTs.

- `source.HttpSource` serves a Starlette application with uvicorn;
- `sink.HttpSink` posts with httpx and retries with tenacity;
- `records` contains the JSON record decoding and encoding that the RabbitMQ
  and MQTT connectors share.

The package imports none of them here, so that the message connectors can
use `records` without loading the HTTP server. See
docs/connectors-brokers.md for the configuration reference.
"""
