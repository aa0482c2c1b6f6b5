"""What each `gptoss` subcommand does, given parsed arguments (the parser is in cli.py)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import EngineArgs, build_engine, build_executor
from model_shards.chat import parse_completion, render_chat
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import CHAT_STOP_TOKENS, TEXT_STOP_TOKENS, decode, encode


class UsageError(ValueError):
    """A command-line argument that parsed but does not make sense."""


def engine_args(args: argparse.Namespace, engine: str | None = None) -> EngineArgs:
    cluster = ClusterConfig(
        attention_replicas=args.attention_replicas, expert_shards=args.expert_shards,
        expert_bounds=tuple(args.expert_split) if args.expert_split else None,
        gpus_per_attention_replica=args.gpus_per_attention_replica, gpus_per_expert_shard=args.gpus_per_expert_shard,
        gpus_per_router=args.gpus_per_router, cpus_per_actor=args.cpus_per_actor,
        keep_mxfp4=args.expert_weights == "mxfp4", transport=args.transport, step_timeout_s=args.step_timeout,
        ray_address=args.ray_address)
    return EngineArgs(model=args.model, engine=engine or args.engine, dtype=args.dtype, device=args.device,
                      kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                      cluster=cluster)


def generate(args: argparse.Namespace) -> dict[str, Any]:
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs --prompt")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) \
            + [{"role": "user", "content": args.prompt}]
        prompt_ids = render_chat(messages, reasoning_effort=args.reasoning_effort)
    else:
        prompt_ids = args.prompt_ids if args.prompt_ids is not None else encode(args.prompt)
    stops = () if args.ignore_eos else (CHAT_STOP_TOKENS if args.chat else TEXT_STOP_TOKENS)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=stops)
    start = time.perf_counter()
    engine = build_engine(engine_args(args))
    try:
        loaded = time.perf_counter()
        done = engine.generate([prompt_ids], params)[0]
        finished = time.perf_counter()
        topology = [asdict(a) for a in engine.executor.topology()]
    finally:
        engine.shutdown()
    visible = done.token_ids[:-1] if done.finish_reason == "stop" else done.token_ids
    result: dict[str, Any] = {
        "model": args.model, "engine": args.engine, "dtype": args.dtype,
        "prompt_token_ids": prompt_ids, "token_ids": done.token_ids, "logprobs": done.logprobs,
        "text": decode(visible), "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(done.token_ids)},
        "timing": {"load_s": round(loaded - start, 3), "generate_s": round(finished - loaded, 3)},
        "topology": topology,
    }
    if args.chat:
        parsed = parse_completion(done.token_ids)
        result.update(reasoning=parsed.reasoning, content=parsed.content,
                      tool_calls=[vars(c) for c in parsed.tool_calls])
    return result


def bench(args: argparse.Namespace) -> str:
    from cluster.benchmark import bench_decode
    from deploy.bench import active_bytes_per_token, report

    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or any(e not in ("local", "cluster") for e in engines):
        raise UsageError("--engine takes local, cluster or local,cluster")
    if any(b < 1 for b in args.batch_sizes) or args.steps < 1 or args.input_len < 1:
        raise UsageError("batch sizes, --steps and --input-len must be positive")
    need = max(args.batch_sizes) * (args.input_len + args.steps + 8)
    rows, hops, config = [], [], None
    for name in engines:
        eargs = engine_args(args, name)
        eargs = EngineArgs(**{**vars(eargs), "kv_cache_tokens": max(eargs.kv_cache_tokens, need),
                              "max_num_seqs": max(eargs.max_num_seqs, max(args.batch_sizes))})
        executor = build_executor(eargs)
        try:
            config = executor.config
            rows += bench_decode(executor, name, args.batch_sizes, args.input_len, args.steps)
            if name == "cluster":
                from cluster.hop import measure_hops

                hops = measure_hops(sorted(set(args.batch_sizes)), config.hidden_size, eargs.cluster.transport)
        finally:
            executor.shutdown()
    assert config is not None
    dtype_bytes = 4 if args.dtype == "float32" else 2
    extra: dict[str, Any] = {
        "bench": "decode", "model": args.model, "dtype": args.dtype, "expert_weights": args.expert_weights,
        "input_len": args.input_len, "steps": args.steps, "layers": config.num_hidden_layers,
        "attention_replicas": args.attention_replicas, "expert_shards": args.expert_shards,
        "active_bytes_per_token": active_bytes_per_token(config, dtype_bytes, args.expert_weights == "mxfp4"),
    }
    local = {r.batch_size: r for r in rows if r.engine == "local"}
    extra["cluster_overhead"] = [
        {"batch_size": r.batch_size, "step_ms": r.step_ms_p50 - local[r.batch_size].step_ms_p50,
         "per_layer_us": (r.step_ms_p50 - local[r.batch_size].step_ms_p50) * 1e3 / config.num_hidden_layers}
        for r in rows if r.engine == "cluster" and r.batch_size in local]
    if args.memory_bandwidth_gbs:
        extra["roofline_batch1_tokens_per_s"] = args.memory_bandwidth_gbs * 1e9 / extra["active_bytes_per_token"]
    return report(rows, hops, extra)
