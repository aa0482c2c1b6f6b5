"""`gptoss serve`: the OpenAI-compatible server on Ray Serve.

With no --model it serves a small random-weight model, made once into ~/.cache/gptoss, and says
so. Ray starts inside this process unless --ray-address names an existing cluster. SIGTERM or
Ctrl-C drains: in-flight requests get up to --drain-timeout seconds, new ones are refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from typing import Any

from deploy.app import RANDOM_MODEL_NAME, build_app, parse_args
from model_shards.random_checkpoint import default_random_model
from model_shards.tokenizer import harmony, tokenizer

log = logging.getLogger(__name__)
APP_NAME = "gptoss"


class ServeFailed(RuntimeError):
    """The application could not be deployed (the Serve log above says why)."""


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": args.model, "served_model_name": args.served_model_name, "engine": args.engine,
        "dtype": args.dtype, "device": args.device, "expert_weights": args.expert_weights,
        "kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
        "max_waiting": args.max_waiting, "attention_replicas": args.attention_replicas,
        "expert_shards": args.expert_shards, "expert_split": args.expert_split,
        "gpus_per_attention_replica": args.gpus_per_attention_replica,
        "gpus_per_expert_shard": args.gpus_per_expert_shard, "gpus_per_router": args.gpus_per_router,
        "cpus_per_actor": args.cpus_per_actor, "transport": args.transport, "step_timeout_s": args.step_timeout,
        "api_key": args.api_key, "request_timeout_s": args.request_timeout, "max_body_bytes": args.max_body_bytes,
        "default_max_tokens": args.default_max_tokens, "drain_timeout_s": args.drain_timeout,
        "vocab_dir": os.path.abspath(args.vocab_dir) if args.vocab_dir else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def drain(handle: Any, timeout_s: float) -> None:
    """New requests get 503 from now on; in-flight ones get up to `timeout_s` to finish."""
    left = handle.begin_drain.remote().result()
    print(f"gptoss serve: draining {left} request(s) (up to {timeout_s:.0f}s), then shutting down",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = handle.begin_drain.remote().result()


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    values = app_args(args)
    parse_args(values)  # bad arguments fail here, before Ray starts
    tokenizer(), harmony()  # so does a missing vocabulary (no network and no --vocab-dir)
    if "model" not in values:
        values["model"] = str(default_random_model())
        values.setdefault("served_model_name", RANDOM_MODEL_NAME)
        print(f"gptoss serve: no --model given: serving RANDOM weights (gpt-oss layout, tiny preset) from "
              f"{values['model']} as '{values['served_model_name']}'", file=sys.stderr, flush=True)
    actors = 1 + (args.attention_replicas + args.expert_shards + 1 if args.engine == "cluster" else 0)
    started_ray = not args.ray_address
    if started_ray:
        extra = {"_metrics_export_port": args.metrics_export_port} if args.metrics_export_port else {}
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(actors * args.cpus_per_actor) + 2),
                 include_dashboard=False, logging_level=logging.WARNING, **extra)
    else:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    # The handler only records the signal: it runs on the main thread, inside whatever that thread
    # is blocked in, so it must not take locks (Event.set inside Event.wait deadlocks).
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: signals.append(number))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(build_app(values), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise ServeFailed(f"the server did not start: {str(exc).splitlines()[-1]} (the log above says why)") from None
        name = values.get("served_model_name") or values["model"]
        print(f"gptoss serve: ready on http://{args.host}:{args.port}/v1 (model '{name}', engine {args.engine})",
              flush=True)
        while not signals:
            time.sleep(0.2)
        drain(serve.get_app_handle(APP_NAME), values.get("drain_timeout_s", 30.0))
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0
