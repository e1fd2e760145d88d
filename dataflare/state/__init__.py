"""State and checkpoints: storage, the coordinator, recovery."""
