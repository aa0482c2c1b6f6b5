"""The Ray actors (attention replica, router, expert shard), their placement, the cluster executor and
the expert rebalancer: the only part of `cluster` that imports ray."""
