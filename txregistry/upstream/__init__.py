"""Talking to upstream registries: connections, auth, mirrors and failover."""
