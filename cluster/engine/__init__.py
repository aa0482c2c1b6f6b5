"""The engine: requests, the scheduler and its KV blocks, one step, the local executor (no Ray here)."""
