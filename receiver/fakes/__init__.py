"""Simulated peers: a provider (and, later, subscribers) for demos and tests."""
