"""heartbeatd: proof-of-life heartbeats for a backend host, its Redis and its PostgreSQL."""

__version__ = "1.6.6"
