"""What each `gptoss` subcommand does, given parsed arguments (the parser is in cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict, dataclass

from cluster.launch import ENGINE_GROUPS, EngineArgs, build_engine, build_executor
from cluster.dataplane.messages import ActorInfo
from cluster.options import OptionValue
from deploy.config import LaunchOptions
from deploy.cli.flags import read_options
from model_shards.capabilities import triton_kernels
from model_shards.chat import parse_completion, render_chat
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import CHAT_STOP_TOKENS, TEXT_STOP_TOKENS, decode, encode

# generate and bench run the model in this process unless asked (serve runs it on Ray actors)
LOCAL_DEFAULTS: dict[str, OptionValue] = {"engine": "local"}
ENGINES = ("local", "cluster")


class UsageError(ValueError):
    """A command-line argument that parsed but does not make sense."""


def engine_args(args: argparse.Namespace, **overrides: OptionValue) -> EngineArgs:
    """The command's engine arguments, `--dtype auto` resolved (and the choice printed on stderr)."""
    values = read_options(args, ENGINE_GROUPS, LOCAL_DEFAULTS)
    eargs = EngineArgs.from_options(**{**values, **overrides})
    announce_dtype(getattr(args, "command", "run"), eargs)
    return eargs.resolved()


def announce_dtype(command: str, eargs: EngineArgs) -> None:
    """At start, one line on stderr: the dtype `--dtype auto` chose, and why."""
    if note := eargs.dtype_note():
        print(f"gptoss {command}: {note}", file=sys.stderr, flush=True)


def ray_address(args: argparse.Namespace) -> str | None:
    return read_options(args, [LaunchOptions]).get("ray_address")


@dataclass
class GenerateResult:
    """The JSON line of `gptoss generate --json` (the chat fields only with --chat)."""

    model: str
    engine: str
    dtype: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended generation
    logprobs: list[float]  # of each generated id under the unmodified distribution
    text: str  # decoded, without the final stop token
    finish_reason: str
    usage: dict[str, int]  # prompt_tokens, completion_tokens
    timing: dict[str, float]  # load_s, generate_s
    topology: list[ActorInfo]
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, str]] | None = None

    def record(self) -> dict[str, object]:
        out = asdict(self)
        for chat_only in ("reasoning", "content", "tool_calls"):
            if out[chat_only] is None:
                del out[chat_only]
        return out


def generate(args: argparse.Namespace) -> GenerateResult:
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs --prompt")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) \
            + [{"role": "user", "content": args.prompt}]
        prompt_ids = render_chat(messages, reasoning_effort=args.reasoning_effort)
    else:
        prompt_ids = list(args.prompt_ids) if args.prompt_ids is not None else encode(args.prompt)
    stops = () if args.ignore_eos else (CHAT_STOP_TOKENS if args.chat else TEXT_STOP_TOKENS)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=stops)
    eargs = engine_args(args)
    start = time.perf_counter()
    engine = build_engine(eargs, ray_address(args))
    try:
        loaded = time.perf_counter()
        done = engine.generate([prompt_ids], params)[0]
        finished = time.perf_counter()
        topology = engine.executor.topology()
    finally:
        engine.shutdown()
    visible = done.token_ids[:-1] if done.finish_reason == "stop" else done.token_ids
    result = GenerateResult(
        model=str(eargs.model.model), engine=eargs.engine.engine, dtype=eargs.model.dtype,
        prompt_token_ids=prompt_ids, token_ids=done.token_ids, logprobs=done.logprobs, text=decode(visible),
        finish_reason=done.finish_reason,
        usage={"prompt_tokens": len(prompt_ids), "completion_tokens": len(done.token_ids)},
        timing={"load_s": round(loaded - start, 3), "generate_s": round(finished - loaded, 3)}, topology=topology)
    if args.chat:
        parsed = parse_completion(done.token_ids)
        result.reasoning, result.content = parsed.reasoning, parsed.content
        result.tool_calls = [vars(c) for c in parsed.tool_calls]
    return result


def bench(args: argparse.Namespace) -> str:
    from cluster.bench.benchmark import bench_decode
    from cluster.bench.report import DecodeReport, active_bytes_per_token, report

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise UsageError("--engine takes local, cluster or local,cluster")
    if any(b < 1 for b in args.batch_sizes) or args.steps < 1 or args.input_len < 1:
        raise UsageError("batch sizes, --steps and --input-len must be positive")
    base = engine_args(args)
    if not base.model.model:
        raise UsageError("bench needs --model (or `bench serve --url URL`)")
    need = max(args.batch_sizes) * (args.input_len + args.steps + 8)
    rows, hops, config = [], [], None
    for name in engines:
        room = dataclasses.replace(  # the benchmark prefills every prompt in one step
            base.engine, engine=name, kv_cache_tokens=max(base.engine.kv_cache_tokens, need),
            max_num_seqs=max(base.engine.max_num_seqs, max(args.batch_sizes)),
            max_num_batched_tokens=max(base.engine.max_num_batched_tokens, max(args.batch_sizes) * args.input_len))
        executor = build_executor(dataclasses.replace(base, engine=room), ray_address(args))
        try:
            config = executor.config
            rows += bench_decode(executor, name, list(args.batch_sizes), args.input_len, args.steps)
            if name == "cluster":
                from cluster.bench.hop import measure_hops  # imports ray: only when asked for

                hops = measure_hops(sorted(set(args.batch_sizes)), config.hidden_size, base.cluster.transport)
        finally:
            executor.shutdown()
    assert config is not None
    asked = base.model.keep_mxfp4  # None: auto, packed where the Triton kernels run
    mxfp4 = triton_kernels(base.model.device) if asked is None else asked
    active = active_bytes_per_token(config, 4 if base.model.dtype == "float32" else 2, mxfp4)
    local = {r.batch_size: r for r in rows if r.engine == "local"}
    overhead = [{"batch_size": r.batch_size, "step_ms": r.step_ms_p50 - local[r.batch_size].step_ms_p50,
                 "per_layer_us": (r.step_ms_p50 - local[r.batch_size].step_ms_p50) * 1e3 / config.num_hidden_layers}
                for r in rows if r.engine == "cluster" and r.batch_size in local]
    record = DecodeReport(
        model=str(base.model.model), dtype=base.model.dtype, expert_weights="mxfp4" if mxfp4 else "dequantize",
        input_len=args.input_len, steps=args.steps, layers=config.num_hidden_layers,
        attention_replicas=base.cluster.attention_replicas, expert_shards=base.cluster.expert_shards,
        active_bytes_per_token=active, cluster_overhead=overhead,
        roofline_batch1_tokens_per_s=args.memory_bandwidth_gbs * 1e9 / active if args.memory_bandwidth_gbs else None)
    return report(rows, hops, record)
