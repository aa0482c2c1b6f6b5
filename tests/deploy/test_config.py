"""The server's configuration: it holds the engine's arguments, and one function prepares it for both
`gptoss serve` and the RayService application (deploy/config.py: prepare)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cluster.launch import EngineArgs
from deploy.config import API_KEY_ENV, RANDOM_MODEL_NAME, AppConfig, ServerConfig, prepare
from model_shards.capabilities import AUTO, choose_dtype


def test_the_server_config_contains_the_engine_args() -> None:
    config = AppConfig.from_options({"model": "m", "engine": "local", "max_num_seqs": 8, "api_key": "k"})
    assert isinstance(config.args, EngineArgs) and config.engine_args() is config.args
    assert (config.model.model, config.engine.engine, config.engine.max_num_seqs) == ("m", "local", 8)
    assert config.server.api_key == "k"
    assert AppConfig.from_options(config.options()) == config  # options() and from_options() are inverses


def test_prepare_fills_in_what_was_left_open_once(vocab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    said: list[str] = []
    ready = prepare(AppConfig(), said.append)
    assert ready.model.model and Path(ready.model.model).is_dir()  # the random model, made once
    assert ready.model_name() == RANDOM_MODEL_NAME and ready.server.api_key == "sk-env"
    assert ready.model.dtype == choose_dtype(AUTO, "cpu").dtype  # resolved: what actors are given
    assert any("RANDOM weights" in s for s in said) and any(s.startswith(f"dtype {ready.model.dtype}") for s in said)
    again: list[str] = []
    assert prepare(ready, again.append) == ready and again == []  # a prepared config comes back unchanged


def test_prepare_reads_the_named_key_and_refuses_a_missing_one(tiny_hf: Path, vocab: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base = AppConfig(EngineArgs.from_options(model=str(tiny_hf), dtype="float32"),
                     ServerConfig(api_key_env="MY_SERVER_KEY"))
    monkeypatch.setenv("MY_SERVER_KEY", "sk-named")
    monkeypatch.setenv(API_KEY_ENV, "sk-ignored")
    assert prepare(base, print).server.api_key == "sk-named"
    monkeypatch.delenv("MY_SERVER_KEY")
    with pytest.raises(ValueError, match="MY_SERVER_KEY"):
        prepare(base, print)
    given = dataclasses.replace(base, server=ServerConfig(api_key="sk-given"))
    assert prepare(given, print).server.api_key == "sk-given"

