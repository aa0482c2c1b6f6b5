"""Expert load balancing: which shard owns which expert (eplb) and where each row goes (dispatch)."""
