"""Parallelism: logical-axis sharding rules and mesh helpers."""
