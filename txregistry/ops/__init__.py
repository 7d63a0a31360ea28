"""Running txregistry: listeners, logs, systemd and metrics."""
