"""The daemon: CLI, lifecycle (signals, drain), HTTP (metrics, health), logging."""
