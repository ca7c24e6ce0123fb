"""Restart policies: per-slot backoff (backoff.py), the crash-loop breaker (breaker.py),
refusing connections while no worker runs (gate.py), rolling reload (rolling.py)."""
