"""Redis Streams source and sink (type `redis`), and Redis lookup tables.

Built on redis-py. `source` and `sink` contain the connectors, with
examples, acknowledgements and delivery guarantees. `lookup` serves Redis
as the table of the `enrichment` transformation, and `config` has the
settings, importable without redis-py. See docs/connectors-brokers.md for the
configuration reference.
"""
