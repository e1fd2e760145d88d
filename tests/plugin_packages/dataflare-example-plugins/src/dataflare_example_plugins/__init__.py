"""Example third-party DataFlare plugins, installed by the plugin tests."""
