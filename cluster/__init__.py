"""Distribution of gpt-oss over Ray actors (attention replicas, router, expert shards)."""
