"""Restart policies: per-slot backoff and breaker (backoff.py), rolling reload (rolling.py)."""
