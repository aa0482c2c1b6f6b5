"""The device check behind scripts/gpu-check.sh: a gpt-oss-20b-shaped model with random weights, built
directly on the device (nothing 20b-sized is made or quantised on the CPU), decoding at a few batch
sizes with dense experts (bf16 on CUDA, float32 on the CPU) and with MXFP4 experts. Per row: ms per step, tokens/s, host syncs per step, kernels
(on the CPU: dispatched ops) per layer, and the bytes a step reads over its time against the device's
copy bandwidth. Where the Triton kernels run, each kernel's achieved GB/s too (kernel_check.py).
Ends with one JSON line.

It imports torch and model_shards only (no Ray, no tokenizer, no web stack): the bare GPU machine
has nothing else. `--cpu` runs the same steps with the tiny preset, which is how CI tests it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from cluster.bench.kernel_check import kernel_rows
from model_shards.batch import SeqChunk, plan_step
from model_shards.capabilities import triton_kernels
from model_shards.config import GptOssConfig, preset
from model_shards.decode_graph import StaticDecoder
from model_shards.draw import argmax_rows
from model_shards.kv_cache import KVCache
from model_shards.model import GptOssModel
from model_shards.moe import likely_active
from model_shards.syncs import count_dispatch
from model_shards.weights import DenseStack, ModelWeights, Mxfp4Stack, empty_model, prepare


@dataclass
class CheckRow:
    experts: str  # dense | mxfp4 (the expert weights' form: the model dtype, or packed and decoded on use)
    batch: int
    ms_per_step: float
    tokens_per_s: float
    host_syncs_per_step: int  # CUDA: torch's sync debug mode's warnings; CPU: syncs.py's count
    kernels_per_layer: float  # CUDA: kernels the profiler saw; CPU: dispatched ops (syncs.py)
    read_gb_per_s: float  # the bytes one step reads (weights in use + KV) over its time
    graphs: bool  # the step replayed a CUDA graph


def device_weights(cfg: GptOssConfig, dtype: torch.dtype, device: torch.device, mxfp4_experts: bool,
                   seed: int = 0) -> ModelWeights:
    """Random weights of cfg's shapes, made on `device` (norms and sinks fp32 as the loaders make
    them; MXFP4 experts as random e2m1 codes with scales near 2^-4)."""
    torch.manual_seed(seed)
    w = empty_model(cfg, str(device), dtype)

    def fill(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.normal_(mean, std)

    h = cfg.hidden_size
    fill(w.globals.embedding, 1.0)
    w.globals.final_norm = torch.ones(h, device=device)
    fill(w.globals.unembedding.weight, 4.0 / math.sqrt(h))
    for a in w.attention:
        a.attn_norm, a.mlp_norm = torch.ones(h, device=device), torch.ones(h, device=device)
        fill(a.qkv.weight, 1.0 / math.sqrt(h))
        assert a.qkv.bias is not None and a.out.bias is not None
        fill(a.qkv.bias, 0.1)
        a.sinks = torch.randn(cfg.num_attention_heads, device=device)
        fill(a.out.weight, 0.5 / math.sqrt(cfg.q_dim))
        fill(a.out.bias, 0.02)
    for r in w.routers:
        fill(r.weight, 1.0 / math.sqrt(h))
        assert r.bias is not None
        fill(r.bias, 0.1)
    for e in w.experts:
        for stack, fan_in in ((e.gate_up, h), (e.down, cfg.intermediate_size)):
            assert isinstance(stack, DenseStack)
            fill(stack.weight, 1.0 / math.sqrt(fan_in))
        fill(e.gate_up_bias, 0.1)
        fill(e.down_bias, 0.02)
        if mxfp4_experts:
            e.gate_up, e.down = (_random_mxfp4(s.weight.shape, device) for s in (e.gate_up, e.down))
    prepare(w)
    return w


def _random_mxfp4(shape: torch.Size, device: torch.device) -> Mxfp4Stack:
    """[n, out, in] -> random packed codes (two e2m1 per byte) and e8m0 scales 2^-6..2^-2."""
    n, out, cols = shape
    blocks = torch.randint(0, 256, (n, out, cols // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(127 - 6, 127 - 1, (n, out, cols // 32), dtype=torch.uint8, device=device)
    return Mxfp4Stack(blocks, scales)


def copy_gb_per_s(device: torch.device, mib: int) -> float:
    """The device's copy bandwidth (read + write bytes per second) over a `mib` MiB buffer."""
    a = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(w: ModelWeights, batch: int, keys: int) -> int:
    """Bytes a decode step of `batch` sequences with about `keys` keys each reads: the weights it uses
    (attention, routers, the unembedding, the experts its tokens likely route to) and the KV."""
    cfg = w.config

    def size(t: object) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, DenseStack):
            return size(t.weight)
        if isinstance(t, Mxfp4Stack):
            return size(t.blocks) + size(t.scales)
        return 0

    experts = likely_active(batch, cfg.experts_per_token, cfg.num_experts) / cfg.num_experts
    total = size(w.globals.unembedding.weight)
    for a, r, e in zip(w.attention, w.routers, w.experts):
        total += size(a.qkv.weight) + size(a.out.weight) + size(r.weight)
        total += int(experts * (size(e.gate_up) + size(e.down) + size(e.gate_up_bias) + size(e.down_bias)))
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * w.globals.embedding.element_size()
    for layer in range(cfg.num_hidden_layers):
        total += batch * kv_row * (min(keys, cfg.sliding_window) if cfg.is_sliding(layer) else keys)
    return total


def measure(w: ModelWeights, experts: str, batch: int, input_len: int, steps: int) -> CheckRow:
    """Prefill `batch` prompts, then time `steps` greedy decode steps and count one more."""
    model = GptOssModel(w)
    dev, cfg = model.device, model.config
    block = 16
    blocks = batch * (-(-(input_len + steps + 4) // block))
    kv = KVCache(cfg, blocks, block, dtype=model.dtype, device=dev)
    decoder = StaticDecoder(model, lambda layer, t, real: model.local_moe(layer, t), graphs=True)
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, cfg.vocab_size, (batch, input_len), generator=gen)
    for s in range(batch):
        kv.place(s, input_len + steps + 4)
    chunks = [SeqChunk(s, 0, input_len) for s in range(batch)]
    logits = model.forward(prompts.reshape(-1).to(dev), plan_step(chunks, dev), kv)
    tokens = argmax_rows(logits).tolist()

    def step(position: int) -> list[int]:
        out = decoder.run(kv, [SeqChunk(s, position, 1) for s in range(batch)], tokens)
        return argmax_rows(out).tolist()  # the step's one read of the device

    times = []
    for i in range(steps + 2):  # the first two: the bucket's capture (or first run) and a warm replay
        _sync(dev)
        start = time.perf_counter()
        tokens = step(input_len + i)
        _sync(dev)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    step_s = times[len(times) // 2]
    syncs, kernels = _count_step(dev, lambda: step(input_len + steps + 2), cfg.num_hidden_layers)
    return CheckRow(experts, batch, step_s * 1e3, batch / step_s, syncs, kernels,
                    step_bytes(w, batch, input_len + steps) / step_s / 1e9, decoder.graphs)


def _count_step(dev: torch.device, run: object, layers: int) -> tuple[int, float]:
    """(host syncs, kernels or ops per layer) of one call of `run`."""
    assert callable(run)
    if dev.type != "cuda":
        with count_dispatch() as count:
            run()
        return count.syncs, count.ops / layers
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return max(0, syncs - 1), kernels / layers  # less the profiler's own closing synchronize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the tiny preset on the CPU (what CI runs)")
    p.add_argument("--preset", default=None, help="model shapes (default: gpt-oss-20b; tiny with --cpu)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--kernel-context", type=int, default=4096, help="keys per sequence of the attention kernel's rows")
    args = p.parse_args(argv)
    dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.cpu:
        p.error("no CUDA device here: run with --cpu")
    cfg = preset(args.preset or ("tiny" if args.cpu else "gpt-oss-20b"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # what --dtype auto picks on most CPUs
    copy = copy_gb_per_s(dev, 256 if dev.type == "cpu" else 2048)
    rows = []
    for experts in ("dense", "mxfp4"):
        start = time.perf_counter()
        w = device_weights(cfg, dtype, dev, experts == "mxfp4")
        built = time.perf_counter() - start
        print(f"{experts} experts: {w.num_parameters() / 1e9:.2f}B parameters built on {dev} in {built:.1f}s",
              flush=True)
        for b in (int(x) for x in args.batch_sizes.split(",")):
            rows.append(measure(w, experts, b, args.input_len, args.steps))
            r = rows[-1]
            print(f"  batch {b:>3}: {r.ms_per_step:8.2f} ms/step {r.tokens_per_s:9.1f} tok/s "
                  f"{r.host_syncs_per_step:>3} syncs/step {r.kernels_per_layer:6.1f} kernels/layer "
                  f"{r.read_gb_per_s:8.1f} GB/s read ({r.read_gb_per_s / copy:.0%} of copy)"
                  f"{'  graph' if r.graphs else ''}", flush=True)
        del w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    kernels = []
    if triton_kernels(dev):  # CUDA with triton (or forced on the CPU: GPTOSS_KERNELS=triton)
        print(f"Triton kernels, {args.kernel_context} keys per sequence:", flush=True)
        for k in kernel_rows(cfg, dtype, dev, [int(x) for x in args.batch_sizes.split(",")], args.kernel_context,
                             reps=20 if dev.type == "cuda" else 1):
            kernels.append(k)
            print(f"  {k.kernel:<14} {k.shape:<44} {k.us:9.1f} us {k.gb_per_s:8.1f} GB/s ({k.gb_per_s / copy:.0%} of copy)",
                  flush=True)
    else:
        print("Triton kernels: not run here (CUDA with triton runs them)")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(json.dumps({"device": name, "preset": args.preset or ("tiny" if args.cpu else "gpt-oss-20b"),
                      "torch": torch.__version__, "copy_gb_per_s": copy, "input_len": args.input_len,
                      "rows": [asdict(r) for r in rows], "kernels": [asdict(k) for k in kernels]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
