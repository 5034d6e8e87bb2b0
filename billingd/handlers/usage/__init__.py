"""Usage (seeds 001, 004): the `usage` handler, its CloudEvents mapping (`cloudevents`) and which
event types are metered (`meters`)."""
