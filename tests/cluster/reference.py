"""What the cluster tests compare with: the local engine's float32 output on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

from cluster.config import KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from model_shards.requests import Completion
from model_shards.sampling import SamplingParams


def local_completions(checkpoint: Path, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      kv: KVSpec) -> list[Completion]:
    engine = Engine(LocalExecutor(ModelSource(str(checkpoint), "float32"), kv))
    try:
        return engine.generate(prompts, params)
    finally:
        engine.shutdown()
