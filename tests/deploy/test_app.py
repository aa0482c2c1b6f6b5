"""deploy.app:build_app, the RayService import_path: validated arguments, a Serve application."""

from __future__ import annotations

import pytest
from ray.serve import Application

from deploy.app import build_app, parse_args


def test_good_arguments_build_an_application() -> None:
    app = build_app({"model": "/models/gpt-oss-20b", "engine": "cluster", "expert_shards": 4,
                     "gpus_per_expert_shard": 1, "api_key": "sk-1", "request_timeout_s": 60.0})
    assert isinstance(app, Application)
    assert parse_args({}).engine == "cluster" and parse_args({}).model is None  # a random model by default


@pytest.mark.parametrize("args, names", [
    ({"engine": "gpu"}, ["engine"]),
    ({"max_num_seqs": 0, "kv_cache_tokens": "10"}, ["max_num_seqs", "kv_cache_tokens"]),
    ({"unknown_option": 1}, ["unknown_option"]),
    ({"transport": "carrier-pigeon"}, ["transport"]),
])
def test_bad_arguments_are_named(args: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        build_app(args)
    message = str(error.value)
    assert message.startswith("invalid gptoss application arguments")
    for name in names:
        assert name in message


def test_engine_args_follow_the_app_args() -> None:
    args = parse_args({"model": "m", "engine": "cluster", "attention_replicas": 2, "expert_shards": 3,
                       "expert_split": [5, 10], "expert_weights": "mxfp4", "max_model_len": 1024})
    engine = args.config().engine_args()
    assert engine.cluster.attention_replicas == 2 and engine.cluster.expert_split == (5, 10)
    assert engine.model.keep_mxfp4 and engine.engine.max_model_len == 1024
