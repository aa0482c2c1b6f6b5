"""Formatting of `gptoss bench`: a table for people, then one JSON line for comparing runs."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from cluster.bench.benchmark import DecodeRow
from cluster.bench.hop import HopRow
from model_shards.config import GptOssConfig
from model_shards.mxfp4 import BLOCK


@dataclass
class DecodeReport:
    """What the JSON line says besides the rows: the run's settings and derived numbers."""

    model: str
    dtype: str
    expert_weights: str
    input_len: int
    steps: int
    layers: int
    attention_replicas: int
    expert_shards: int
    active_bytes_per_token: int  # weights one batch-1 decode token reads
    cluster_overhead: list[dict[str, float]] = field(default_factory=list)  # batch_size, step_ms, per_layer_us
    roofline_batch1_tokens_per_s: float | None = None  # with --memory-bandwidth-gbs
    bench: str = "decode"


@dataclass(frozen=True)
class Machine:
    platform: str
    cpus: int
    torch: str
    threads: int
    gpu: str | None


def active_bytes_per_token(cfg: GptOssConfig, dtype_bytes: int, mxfp4_experts: bool) -> int:
    """Weight bytes one decode token reads at batch 1: attention and router of every layer, its K
    experts per layer, one embedding row and the whole unembedding. Divided into the memory
    bandwidth this gives the batch-1 roofline."""
    h, inter, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim + 2 * cfg.kv_dim
    attention = (qkv * h + qkv + h * cfg.q_dim + h) * dtype_bytes + (2 * h + cfg.num_attention_heads) * 4
    router = (cfg.num_experts * h + cfg.num_experts) * dtype_bytes
    weights = 2 * inter * h + h * inter
    expert = (weights // 2 + weights // BLOCK if mxfp4_experts else weights * dtype_bytes) + (2 * inter + h) * dtype_bytes
    per_layer = attention + router + cfg.experts_per_token * expert
    return cfg.num_hidden_layers * per_layer + (cfg.vocab_size + 1) * h * dtype_bytes


def machine() -> Machine:
    return Machine(platform.platform(), os.cpu_count() or 1, torch.__version__, torch.get_num_threads(),
                   torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(rows: list[DecodeRow], hops: list[HopRow], extra: DecodeReport) -> str:
    header = (f"{'engine':<12} {'batch':>5} {'prefill ms':>11} {'step ms p50':>12} {'step ms p90':>12} "
              f"{'tokens/s':>9} {'moe wait us/layer':>18} {'replica':>8} {'router':>7} {'shard':>7} {'data plane us/layer':>20} "
              f"{'shard imbalance':>16} {'syncs/step':>10} {'ops/layer':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.engine:<12} {r.batch_size:>5} {r.prefill_ms:>11.1f} {r.step_ms_p50:>12.2f} "
                     f"{r.step_ms_p90:>12.2f} {r.tokens_per_s:>9.1f} {_us(r.moe_wait_us_per_layer):>18} "
                     f"{_us(r.replica_us_per_layer):>8} "
                     f"{_us(r.router_us_per_layer):>7} {_us(r.shard_us_per_layer):>7} "
                     f"{_us(r.data_plane_us_per_layer):>20} "
                     f"{'-' if r.shard_imbalance is None else f'{r.shard_imbalance:.2f}':>16} "
                     f"{'-' if r.host_syncs_per_step is None else r.host_syncs_per_step:>10} "
                     f"{'-' if r.ops_per_layer is None else f'{r.ops_per_layer:.0f}':>9}")
    if hops:
        lines += ["", f"{'hop rows':>8} {'bytes':>10} {'raw one-way us':>15} {'framed one-way us':>18} "
                      f"{'raw 3-hop layer path us':>24}"]
        lines += [f"{h.rows:>8} {h.payload_bytes:>10} {h.raw_us:>15.1f} {h.framed_us:>18.1f} {h.layer_path_us:>24.1f}"
                  for h in hops]
    if extra.cluster_overhead:
        lines += ["", f"{'batch':>5} {'cluster - local ms/step':>24} {'per layer us':>13}"]
        lines += [f"{o['batch_size']:>5} {o['step_ms']:>24.2f} {o['per_layer_us']:>13.0f}"
                  for o in extra.cluster_overhead]
    record = {**asdict(extra), "machine": asdict(machine()), "results": [asdict(r) for r in rows],
              "hops": [asdict(h) for h in hops]}
    lines.append(json.dumps(record))
    return "\n".join(lines)
