"""Supervision: the source actor, the one_for_one supervisor, circuit breakers, backoff, metrics."""
