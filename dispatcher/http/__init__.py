"""The HTTP API every replica serves (FastAPI)."""
