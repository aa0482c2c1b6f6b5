"""The `gptoss` command line.

    gptoss generate --model PATH_OR_ID (--prompt TEXT | --prompt-ids 1,2,3) [--engine local|cluster] [--json]
    gptoss bench --model PATH --engine local,cluster --batch-sizes 1,16,64
    gptoss make-tiny OUT [--preset tiny|small] [--layout hf|original] [--mxfp4/--no-mxfp4] [--seed N]
    gptoss serve [--model PATH_OR_ID] [--host] [--port] [--engine local|cluster] [--api-key KEY] ...

`generate --json` is the project's scripting interface: its last line is one JSON object with at
least token_ids, logprobs, text and finish_reason (or an `error` object, with exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from cluster.engine import EngineOverloaded, EngineUnavailable
from cluster.executor import ExecutorFailure
from deploy import commands
from deploy.serve_cmd import ServeFailed
from model_shards.chat import ChatFormatError
from model_shards.checkpoint import CheckpointError
from model_shards.config import PRESETS, ConfigError
from model_shards.layout import LAYOUTS
from model_shards.loader import DTYPES
from model_shards.random_checkpoint import make_tiny
from model_shards.requests import InvalidRequest
from model_shards.tokenizer import TokenizerUnavailable, use_vocab_dir

# Errors that are the user's to fix, or that say the cluster could not serve: reported in one line
# (and as JSON with --json), never as a traceback.
USER_ERRORS = (InvalidRequest, CheckpointError, ConfigError, ChatFormatError, TokenizerUnavailable,
               commands.UsageError, FileNotFoundError, ValueError, EngineOverloaded, EngineUnavailable,
               ExecutorFailure, ServeFailed)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_engine_args(p: argparse.ArgumentParser, model_required: bool = True, engine_default: str = "local") -> None:
    p.add_argument("--model", required=model_required,
                   help="checkpoint directory or Hugging Face id (openai/gpt-oss-20b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--engine", default=engine_default, help="local (this process) or cluster (Ray actors)")
    p.add_argument("--expert-weights", choices=["dequantize", "mxfp4"], default="dequantize",
                   help="dequantize MXFP4 experts at load (fast) or keep them packed and decode on use (4x less memory)")
    p.add_argument("--device", default="cpu", help="torch device of the local engine, e.g. cuda")
    p.add_argument("--kv-cache-tokens", type=int, default=65536, help="KV positions per attention replica")
    p.add_argument("--max-num-seqs", type=int, default=64, help="running sequences per attention replica")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (prefill is chunked)")
    p.add_argument("--max-model-len", type=int, help="prompt + output limit (default: the model's)")
    c = p.add_argument_group("cluster engine")
    c.add_argument("--attention-replicas", type=int, default=1)
    c.add_argument("--expert-shards", type=int, default=1)
    c.add_argument("--expert-split", type=_int_list, help="explicit shard boundaries, e.g. 10,20 for 3 shards")
    c.add_argument("--gpus-per-attention-replica", type=float, default=0.0)
    c.add_argument("--gpus-per-expert-shard", type=float, default=0.0)
    c.add_argument("--gpus-per-router", type=float, default=0.0)
    c.add_argument("--cpus-per-actor", type=float, default=1.0)
    c.add_argument("--transport", choices=["auto", "shm", "tcp"], default="auto",
                   help="data plane: shared memory on one node, TCP between nodes (auto picks per pair)")
    c.add_argument("--step-timeout", type=float, default=60.0, help="seconds before a step counts as hung")
    c.add_argument("--ray-address", help="an existing Ray cluster (default: start one in this process)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Serve and run gpt-oss models.")
    parser.add_argument("--vocab-dir", help="directory holding o200k_base.tiktoken, for machines without network")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate tokens for one prompt")
    _add_engine_args(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (raw, or a user message with --chat)")
    source.add_argument("--prompt-ids", type=_int_list, help="prompt token ids, comma-separated")
    g.add_argument("--chat", action="store_true", help="render --prompt as a harmony chat user message")
    g.add_argument("--system", help="instructions for the chat (with --chat)")
    g.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at stop tokens")
    g.add_argument("--json", action="store_true", help="end with one JSON line")

    b = sub.add_parser("bench", help="decode step time and tokens/s per batch size; `bench serve` for HTTP load")
    _add_engine_args(b, model_required=False, engine_default="local")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 64])
    b.add_argument("--input-len", type=int, default=32)
    b.add_argument("--steps", type=int, default=16)
    b.add_argument("--memory-bandwidth-gbs", type=float,
                   help="memory bandwidth (GB/s) to print the batch-1 roofline beside the measurement")
    targets = b.add_subparsers(dest="target")
    bs = targets.add_parser("serve", help="load any OpenAI-compatible server: TTFT, ITL, E2EL, tokens/s")
    bs.add_argument("--url", required=True, help="the API base, e.g. http://127.0.0.1:8000/v1")
    bs.add_argument("--concurrency", type=_int_list, default=[1, 8, 32])
    bs.add_argument("--num-prompts", type=int, default=64)
    bs.add_argument("--input-len", type=int, default=128)
    bs.add_argument("--output-len", type=int, default=64)
    bs.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    bs.add_argument("--prompt-type", choices=["tokens", "text"], default="tokens")
    bs.add_argument("--api-key")
    bs.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the real gpt-oss layout")
    t.add_argument("out")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument("--layout", choices=LAYOUTS, default="hf")
    t.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=True, help="experts in MXFP4")
    t.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server on Ray Serve")
    _add_engine_args(s, model_required=False, engine_default="cluster")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model name clients use (default: --model)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond which clients get 429")
    s.add_argument("--request-timeout", type=float, help="seconds before a request ends with 408 (default: none)")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20)
    s.add_argument("--default-max-tokens", type=int, default=4096, help="for chat requests that give none")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get at shutdown")
    s.add_argument("--metrics-export-port", type=int,
                   help="port of Ray's metrics export when Ray starts here (Prometheus scrapes ray_gptoss_* there)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.vocab_dir:
            use_vocab_dir(args.vocab_dir)
        if args.command == "generate":
            result = commands.generate(args)
            print(json.dumps(result) if args.json else result["text"])
        elif args.command == "bench" and args.target == "serve":
            from deploy.loadgen import bench_serve

            if min(args.concurrency or [0]) < 1 or args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
                raise commands.UsageError("concurrency, --num-prompts, --input-len and --output-len must be positive")
            print(bench_serve(args.url, args.concurrency, args.num_prompts, args.input_len, args.output_len,
                              args.model, args.prompt_type, args.api_key, args.seed))
        elif args.command == "bench":
            if not args.model:
                raise commands.UsageError("bench needs --model (or `bench serve --url URL`)")
            print(commands.bench(args))
        elif args.command == "make-tiny":
            path = make_tiny(args.out, args.preset, args.layout, args.mxfp4, args.seed)
            print(f"wrote a random {args.preset} checkpoint ({args.layout} layout) to {path}")
        elif args.command == "serve":
            from deploy.serve_cmd import run

            return run(args)
    except USER_ERRORS as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"message": str(exc), "type": type(exc).__name__}}))
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
