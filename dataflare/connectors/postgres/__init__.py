"""PostgreSQL connectors: the `postgres` source and sink.

The source reads a table or query in one of three modes (`full`,
`incremental`, `cdc`); the sink inserts or upserts rows, applies change
records, and delivers exactly once when the pipeline takes checkpoints.
See docs/connectors-databases.md.
"""

from dataflare.connectors.postgres.sink import PostgresSink, PostgresSinkConfig
from dataflare.connectors.postgres.source import PostgresSource, PostgresSourceConfig

__all__ = [
    "PostgresSink",
    "PostgresSinkConfig",
    "PostgresSource",
    "PostgresSourceConfig",
]
