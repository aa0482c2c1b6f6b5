"""The modules that hold only math import with torch alone: a bare GPU machine has torch and triton
but not openai-harmony, tiktoken, llguidance, Ray or the web stack (scripts/gpu-check.sh runs them
there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MATH = ["model_shards.model", "model_shards.attention", "model_shards.flash", "model_shards.moe",
        "model_shards.kv_cache", "model_shards.batch", "model_shards.sampling", "model_shards.draw",
        "model_shards.logits", "model_shards.weights", "model_shards.checkpoint", "model_shards.random_checkpoint",
        "model_shards.syncs", "model_shards.token_mask", "model_shards.capabilities", "model_shards.decode_graph",
        "model_shards.tokenizer", "cluster.bench.device_check"]
ABSENT = ["openai_harmony", "llguidance", "ray", "pydantic", "fastapi", "starlette", "httpx"]  # tiktoken is there

BLOCKER = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on this machine")
sys.meta_path.insert(0, Absent())
for module in {MATH!r}:
    __import__(module)
print("ok")
"""


def test_math_modules_import_without_the_serving_stack() -> None:
    run = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
