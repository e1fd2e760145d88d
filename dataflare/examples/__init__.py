"""Example data and pipelines shipped with DataFlare."""
