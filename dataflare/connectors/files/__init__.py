"""connectors/files"""
