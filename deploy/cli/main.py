"""The `gptoss` command line.

    gptoss generate --model PATH_OR_ID (--prompt TEXT | --prompt-ids 1,2,3) [--engine local|cluster] [--json]
    gptoss bench --model PATH --engine local,cluster --batch-sizes 1,16,64
    gptoss bench serve --url http://127.0.0.1:8000/v1 [--request-rate 1,2,4,inf] [--save-result FILE]
    gptoss bench plot FILE... -o curve.png
    gptoss make-tiny OUT [--preset tiny|small] [--layout hf|original] [--mxfp4/--no-mxfp4] [--seed N]
                  [--router-skew S]
    gptoss serve [--model PATH_OR_ID] [--host] [--port] [--engine local|cluster] [--api-key KEY] ...

The engine and server flags are generated from the configuration schema (cluster/config.py,
deploy/config.py), which also makes the RayService application args. `generate --json` is the
project's scripting interface: its last line is one JSON object with at least token_ids, logprobs,
text and finish_reason (or an `error` object, with exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from cluster.config import ClusterConfig, EngineConfig, ModelConfig
from cluster.engine.events import EngineOverloaded, EngineUnavailable
from cluster.options import OptionValue
from cluster.engine.executor import ExecutorFailure
from deploy.cli import bench_cmd, commands
from deploy.config import LaunchOptions, ServerConfig
from deploy.cli.flags import add_options, int_list
from deploy.cli.serve_cmd import ServeFailed
from model_shards.chat import ChatFormatError
from model_shards.checkpoint import CheckpointError
from model_shards.config import PRESETS, ConfigError
from model_shards.layout import LAYOUTS
from model_shards.random_checkpoint import make_tiny
from model_shards.requests import InvalidRequest
from model_shards.tokenizer import TokenizerUnavailable, use_vocab_dir

# Errors that are the user's to fix, or that say the cluster could not serve: reported in one line
# (and as JSON with --json), never as a traceback.
USER_ERRORS = (InvalidRequest, CheckpointError, ConfigError, ChatFormatError, TokenizerUnavailable,
               commands.UsageError, FileNotFoundError, ValueError, EngineOverloaded, EngineUnavailable,
               ExecutorFailure, ServeFailed, ConnectionError)
RAY_ONLY = ("host", "port", "metrics_export_port")  # LaunchOptions that only `serve` has


def _add_engine_options(p: argparse.ArgumentParser, *, required: tuple[str, ...] = (), skip: tuple[str, ...] = (),
                        defaults: dict[str, OptionValue] | None = None) -> None:
    add_options(p.add_argument_group("model"), [ModelConfig], required=required)
    add_options(p.add_argument_group("engine"), [EngineConfig], skip=skip, defaults=defaults)
    add_options(p.add_argument_group("cluster engine"), [ClusterConfig])


def _vocab_option(p: argparse.ArgumentParser) -> None:
    """--vocab-dir where ModelConfig does not bring it (the top level, make-tiny, bench serve)."""
    p.add_argument("--vocab-dir", default=argparse.SUPPRESS,
                   help="directory holding o200k_base.tiktoken, for machines without network "
                        "(accepted before or after the subcommand)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Serve and run gpt-oss models.")
    _vocab_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate tokens for one prompt")
    _add_engine_options(g, required=("model",), defaults=commands.LOCAL_DEFAULTS)
    add_options(g, [LaunchOptions], skip=RAY_ONLY)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (raw, or a user message with --chat)")
    source.add_argument("--prompt-ids", type=int_list, help="prompt token ids, comma-separated")
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
    b.add_argument("--engine", dest="engines", default="local",
                   help="local, cluster, or local,cluster for both in one run")
    _add_engine_options(b, skip=("engine",))
    add_options(b, [LaunchOptions], skip=RAY_ONLY)
    b.add_argument("--batch-sizes", type=int_list, default=(1, 16, 64))
    b.add_argument("--input-len", type=int, default=32)
    b.add_argument("--steps", type=int, default=16)
    b.add_argument("--memory-bandwidth-gbs", type=float,
                   help="memory bandwidth (GB/s) to print the batch-1 roofline beside the measurement")
    targets = b.add_subparsers(dest="target")
    bs = targets.add_parser("serve", help="load any OpenAI-compatible server: TTFT, TPOT, ITL, E2EL, tokens/s, "
                                          "goodput, at concurrency levels or request rates")
    bench_cmd.add_serve_flags(bs)
    _vocab_option(bs)
    bp = targets.add_parser("plot", help="the load curve of saved bench serve results (ours and vLLM's) as a PNG")
    bench_cmd.add_plot_flags(bp)

    t = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the real gpt-oss layout")
    t.add_argument("out")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument("--layout", choices=LAYOUTS, default="hf")
    t.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=True, help="experts in MXFP4")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                   help="logit bonus added to the router bias of a few hot experts per layer (experts_per_token "
                        "of them, in the first quarter of the experts): router logits spread about 1, so 1 is a "
                        "mild preference and 8 sends every token there (2 expert shards: imbalance 2.0, 4: 4.0); "
                        "0, the default, routes about evenly, the same checkpoint as without the flag")
    _vocab_option(t)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server on Ray Serve")
    _add_engine_options(s)
    add_options(s.add_argument_group("server"), [ServerConfig])
    add_options(s.add_argument_group("launch"), [LaunchOptions])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        if getattr(args, "vocab_dir", None):
            use_vocab_dir(args.vocab_dir)
        if args.command == "generate":
            result = commands.generate(args)
            print(json.dumps(result.record()) if args.json else result.text)
        elif args.command == "bench" and args.target == "serve":
            print(bench_cmd.run_serve(args))
        elif args.command == "bench" and args.target == "plot":
            print(bench_cmd.run_plot(args))
        elif args.command == "bench":
            print(commands.bench(args))
        elif args.command == "make-tiny":
            path = make_tiny(args.out, args.preset, args.layout, args.mxfp4, args.seed, router_skew=args.router_skew)
            skew = f", router skew {args.router_skew:g}" if args.router_skew else ""
            print(f"wrote a random {args.preset} checkpoint ({args.layout} layout{skew}) to {path}")
        elif args.command == "serve":
            from deploy.cli.serve_cmd import run

            return run(args, argv)
    except USER_ERRORS as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"message": str(exc), "type": type(exc).__name__}}))
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
