"""The OpenAI-compatible HTTP server (FastAPI app, routes, protocol, errors, metrics)."""
