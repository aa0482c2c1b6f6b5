"""`gptoss bench`: decode step time and tokens/s per batch size.

B sequences of `input_len` random prompt tokens are prefilled together, then `steps` decode steps
are timed one by one (forward pass plus sampling: what a served token costs). The table is for
people; the last line is one JSON object for comparing runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from model_shards.batch import SeqChunk, plan_step
from model_shards.config import GptOssConfig
from model_shards.model import GptOssModel
from model_shards.sampling import SamplingParams, sample
from model_shards.weights import Mxfp4Stack


@dataclass
class DecodeRow:
    engine: str
    batch_size: int
    prefill_ms: float  # one step prefilling all B prompts
    step_ms_p50: float
    step_ms_p90: float
    tokens_per_s: float  # B / median step time


def bench_local(model: GptOssModel, batch_sizes: list[int], input_len: int, steps: int, warmup: int = 2,
                seed: int = 0) -> list[DecodeRow]:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    greedy = SamplingParams(max_tokens=steps + warmup, temperature=0.0)
    rows = []
    for b in batch_sizes:
        total = input_len + warmup + steps
        kv = model.new_cache(num_blocks=b * -(-total // 16), max_seqs=b)
        for i in range(b):
            kv.reserve(i, total)
        prompts = torch.randint(0, cfg.vocab_size, (b * input_len,), generator=gen, device=model.device)
        start = time.perf_counter()
        logits = model.forward(prompts, plan_step([SeqChunk(i, 0, input_len) for i in range(b)], model.device), kv)
        prefill = time.perf_counter() - start
        tokens, _ = sample(logits, [greedy] * b, [0] * b, [0] * b)
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            layout = plan_step([SeqChunk(i, input_len + step, 1) for i in range(b)], model.device)
            logits = model.forward(torch.tensor(tokens, device=model.device), layout, kv)
            tokens, _ = sample(logits, [greedy] * b, [0] * b, [step + 1] * b)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        p50 = statistics.median(times)
        p90 = sorted(times)[min(len(times) - 1, int(0.9 * len(times)))]
        rows.append(DecodeRow("local", b, prefill * 1e3, p50 * 1e3, p90 * 1e3, b / p50))
    return rows


def active_bytes_per_token(model: GptOssModel) -> int:
    """Weight bytes one decode token must read at batch 1: attention and router of every layer,
    its K experts per layer, one embedding row and the unembedding. Divided into the memory
    bandwidth this gives the batch-1 roofline."""
    cfg: GptOssConfig = model.config
    w = model.weights
    size = w.globals.embedding.element_size()
    per_layer_dense = sum(t.numel() * t.element_size() for t in vars(w.attention[0]).values())
    per_layer_dense += sum(t.numel() * t.element_size() for t in vars(w.routers[0]).values())
    experts = w.experts[0]

    def stack_bytes(stack: Any) -> int:
        if isinstance(stack, Mxfp4Stack):
            return stack.blocks[0].numel() + stack.scales[0].numel()
        return stack.weight[0].numel() * stack.weight.element_size()

    per_expert = stack_bytes(experts.gate_up) + stack_bytes(experts.down) \
        + (experts.gate_up_bias[0].numel() + experts.down_bias[0].numel()) * experts.down_bias.element_size()
    per_layer = per_layer_dense + cfg.experts_per_token * per_expert
    return cfg.num_hidden_layers * per_layer + cfg.hidden_size * size + w.globals.unembedding.numel() * size


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(rows: list[DecodeRow], extra: dict[str, Any]) -> str:
    header = f"{'engine':<8} {'batch':>5} {'prefill ms':>11} {'step ms p50':>12} {'step ms p90':>12} {'tokens/s':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.engine:<8} {r.batch_size:>5} {r.prefill_ms:>11.1f} {r.step_ms_p50:>12.2f} "
                     f"{r.step_ms_p90:>12.2f} {r.tokens_per_s:>10.1f}")
    lines.append(json.dumps({**extra, "machine": machine(), "results": [asdict(r) for r in rows]}))
    return "\n".join(lines)
