"""wsrelay: a relay for OpenAI Responses WebSocket sessions that keeps long turns alive and bills them."""

__version__ = "0.1.0"
