"""The `gptoss` command line.

    gptoss generate --model PATH_OR_ID (--prompt TEXT | --prompt-ids 1,2,3) [--json] ...
    gptoss bench --model PATH --engine local --batch-sizes 1,16,64
    gptoss make-tiny OUT [--preset tiny|small] [--layout hf|original] [--mxfp4/--no-mxfp4] [--seed N]
    gptoss serve ...

`generate --json` is the project's scripting interface: its last line is one JSON object with at
least token_ids, logprobs, text and finish_reason (or an `error` object, with exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from model_shards.chat import ChatFormatError, parse_completion, render_chat
from model_shards.checkpoint import CheckpointError
from model_shards.config import PRESETS, ConfigError
from model_shards.generate import InvalidRequest, Request, generate
from model_shards.layout import LAYOUTS
from model_shards.loader import DTYPES, load_local_model, parse_dtype
from model_shards.random_checkpoint import make_tiny
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import CHAT_STOP_TOKENS, TEXT_STOP_TOKENS, TokenizerUnavailable, decode, encode, use_vocab_dir

# Errors that are the user's to fix: reported in one line (and as JSON with --json), never a traceback.
USER_ERRORS = (InvalidRequest, CheckpointError, ConfigError, ChatFormatError, TokenizerUnavailable,
               FileNotFoundError, ValueError)


class UsageError(ValueError):
    """A command-line argument that parsed but does not make sense."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="checkpoint directory or Hugging Face id (openai/gpt-oss-20b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--engine", choices=["local"], default="local")
    p.add_argument("--expert-weights", choices=["dequantize", "mxfp4"], default="dequantize",
                   help="dequantize MXFP4 experts at load (fast) or keep them packed and decode on use (4x less memory)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Serve and run gpt-oss models.")
    parser.add_argument("--vocab-dir", help="directory holding o200k_base.tiktoken, for machines without network")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate tokens for one prompt")
    _add_model_args(g)
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

    b = sub.add_parser("bench", help="decode step time and tokens/s per batch size")
    _add_model_args(b)
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 16, 64])
    b.add_argument("--input-len", type=int, default=32)
    b.add_argument("--steps", type=int, default=16)
    b.add_argument("--memory-bandwidth-gbs", type=float,
                   help="memory bandwidth (GB/s) to print the batch-1 roofline beside the measurement")

    t = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the real gpt-oss layout")
    t.add_argument("out")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument("--layout", choices=LAYOUTS, default="hf")
    t.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=True, help="experts in MXFP4")
    t.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(s, required=False)
    return parser


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
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
    model = load_local_model(args.model, parse_dtype(args.dtype), args.expert_weights == "mxfp4", args.device)
    loaded = time.perf_counter()
    done = generate(model, [Request(prompt_ids, params)])[0]
    finished = time.perf_counter()
    visible = done.token_ids[:-1] if done.finish_reason == "stop" else done.token_ids
    result: dict[str, Any] = {
        "model": args.model, "engine": args.engine, "dtype": args.dtype,
        "prompt_token_ids": prompt_ids, "token_ids": done.token_ids, "logprobs": done.logprobs,
        "text": decode(visible), "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(done.token_ids)},
        "timing": {"load_s": round(loaded - start, 3), "generate_s": round(finished - loaded, 3)},
    }
    if args.chat:
        parsed = parse_completion(done.token_ids)
        result.update(reasoning=parsed.reasoning, content=parsed.content,
                      tool_calls=[vars(c) for c in parsed.tool_calls])
    return result


def cmd_bench(args: argparse.Namespace) -> str:
    from deploy.bench import active_bytes_per_token, bench_local, report

    if any(b < 1 for b in args.batch_sizes) or args.steps < 1 or args.input_len < 1:
        raise UsageError("batch sizes, --steps and --input-len must be positive")
    model = load_local_model(args.model, parse_dtype(args.dtype), args.expert_weights == "mxfp4", args.device)
    rows = bench_local(model, args.batch_sizes, args.input_len, args.steps)
    extra: dict[str, Any] = {"bench": "decode", "model": args.model, "dtype": args.dtype,
                             "expert_weights": args.expert_weights, "input_len": args.input_len,
                             "steps": args.steps, "active_bytes_per_token": active_bytes_per_token(model)}
    if args.memory_bandwidth_gbs:
        extra["roofline_batch1_tokens_per_s"] = args.memory_bandwidth_gbs * 1e9 / extra["active_bytes_per_token"]
    return report(rows, extra)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.vocab_dir:
            use_vocab_dir(args.vocab_dir)
        if args.command == "generate":
            result = cmd_generate(args)
            print(json.dumps(result) if args.json else result["text"])
        elif args.command == "bench":
            print(cmd_bench(args))
        elif args.command == "make-tiny":
            path = make_tiny(args.out, args.preset, args.layout, args.mxfp4, args.seed)
            print(f"wrote a random {args.preset} checkpoint ({args.layout} layout) to {path}")
        elif args.command == "serve":
            print("gptoss serve: not yet available (the Serving issue adds it)", file=sys.stderr)
            return 2
    except USER_ERRORS as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"message": str(exc), "type": type(exc).__name__}}))
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
