"""pyroute: an asyncio L7 reverse proxy for Docker Swarm that speaks Docker Flow Proxy's API."""

__version__ = "0.1.0"
