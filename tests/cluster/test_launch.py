"""From options to an engine: `--dtype auto` is resolved once, for where the model will compute."""

from __future__ import annotations

import pytest

from cluster.launch import EngineArgs
from model_shards.capabilities import AUTO, choose_dtype


def test_dtype_auto_follows_the_device_the_engine_computes_on() -> None:
    cpu = choose_dtype(AUTO, "cpu").dtype
    assert EngineArgs.from_options(model="m", engine="local").resolved().model.dtype == cpu
    assert EngineArgs.from_options(model="m", engine="local", device="cuda").resolved().model.dtype == "bfloat16"
    assert EngineArgs.from_options(model="m", engine="cluster").resolved().model.dtype == cpu
    gpus = EngineArgs.from_options(model="m", engine="cluster", gpus_per_expert_shard=0.5)
    assert gpus.compute_device() == "cuda" and gpus.resolved().model.dtype == "bfloat16"
    asked = EngineArgs.from_options(model="m", engine="local", dtype="bfloat16")
    assert asked.resolved() is asked


def test_only_a_resolved_dtype_reaches_the_actors() -> None:
    args = EngineArgs.from_options(model="m")
    assert args.model.dtype == AUTO  # the default
    with pytest.raises(ValueError, match="resolved"):
        args.model.source()
    assert args.resolved().model.source().dtype in ("float32", "bfloat16")


def test_autoscale_builds_a_policy_whose_maxima_default_to_the_start_counts(tiny_hf) -> None:
    from cluster.config import ClusterConfig
    from cluster.launch import autoscaler, build_engine

    assert autoscaler(ClusterConfig()) is None
    scaler = autoscaler(ClusterConfig(attention_replicas=2, expert_shards=3, autoscale=True, min_expert_shards=2,
                                      max_attention_replicas=4, upscale_delay_s=1.0))
    assert scaler is not None
    p = scaler.policy
    assert (p.min_replicas, p.max_replicas, p.min_shards, p.max_shards) == (1, 4, 2, 3)
    assert (p.upscale_delay_s, p.downscale_delay_s) == (1.0, 600.0)
    with pytest.raises(ValueError, match="min <= max"):
        autoscaler(ClusterConfig(autoscale=True, min_attention_replicas=2))
    with pytest.raises(ValueError, match="needs --engine cluster"):
        build_engine(EngineArgs.from_options(model=str(tiny_hf), engine="local", dtype="float32", autoscale=True))
