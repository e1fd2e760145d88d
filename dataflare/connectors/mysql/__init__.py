"""MariaDB/MySQL connectors: the `mysql` source and sink (PyMySQL).

The source reads a table or query in `full` or `incremental` mode; the sink
inserts or upserts rows, applies change records, and delivers exactly once
when the pipeline takes checkpoints. See docs/connectors-databases.md.
"""

from dataflare.connectors.mysql.sink import MySqlSink, MySqlSinkConfig
from dataflare.connectors.mysql.source import MySqlSource, MySqlSourceConfig

__all__ = ["MySqlSink", "MySqlSinkConfig", "MySqlSource", "MySqlSourceConfig"]
