"""Serving: the Ray Serve OpenAI app, the CLI, metrics and the load generator."""
