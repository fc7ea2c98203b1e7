"""slmfleet control plane: registry, ingest, director and rollout engine."""
