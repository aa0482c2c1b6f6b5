"""`gptoss bench serve` and `gptoss bench plot`: their flags and what they run.

The flags keep vLLM's names where `vllm bench serve` has the same thing (--request-rate, --burstiness,
--dataset-name, --dataset-path, --random-range-ratio, --goodput, --label...), and accept vLLM's
spellings as aliases where ours differ (--max-concurrency for --concurrency, --random-input-len for
--input-len...), so that a vLLM command line mostly runs as it is.
"""

from __future__ import annotations

import argparse

from deploy.cli import commands
from deploy.cli.flags import int_list


def float_list(text: str) -> tuple[float, ...]:
    """"1,2,4,inf" -> (1.0, 2.0, 4.0, inf)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (or inf), got {text!r}") from None


def add_serve_flags(bs: argparse.ArgumentParser) -> None:
    from cluster.bench.datasets import DATASETS
    from cluster.bench.loadgen import ENDPOINTS

    bs.add_argument("--url", required=True, help="the API base, e.g. http://127.0.0.1:8000/v1")
    bs.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                    help="completions (prompts as token ids or text) or chat (text prompts as one user message)")
    load = bs.add_argument_group("load")
    load.add_argument("--request-rate", type=float_list, metavar="R[,R2,...]",
                      help="open loop: requests/s of each level (inf: all at once); without it, closed loop at "
                           "each --concurrency")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps between arrivals: 1 Poisson, below 1 burstier, above 1 more even")
    load.add_argument("--concurrency", "--max-concurrency", type=int_list, metavar="N[,N2,...]",
                      help="closed loop: the levels (default 1,8,32); with --request-rate: the cap on requests in "
                           "flight (vLLM's --max-concurrency)")
    load.add_argument("--num-prompts", type=int, default=64)
    load.add_argument("--seed", type=int, default=0, help="of the prompts and the arrival schedule")
    data = bs.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random",
                      help="random tokens or words; a ShareGPT JSON file; repeated shared prefixes; a text file, "
                           "one prompt per line")
    data.add_argument("--dataset-path", help="the file of sharegpt and text")
    data.add_argument("--input-len", "--random-input-len", "--prefix-repetition-suffix-len", type=int, default=128,
                      help="random: prompt tokens (or words); prefix-repetition: each prompt's own part")
    data.add_argument("--output-len", "--random-output-len", "--prefix-repetition-output-len", type=int, default=64,
                      help="tokens to generate (random, prefix-repetition, text)")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="random: draw both lengths from [L*(1-r), L*(1+r)] per request (r in [0, 1))")
    data.add_argument("--prompt-type", choices=["tokens", "text"],
                      help="random and prefix-repetition: token ids or words (default: tokens; text for chat)")
    data.add_argument("--shared-prefix", "--random-prefix-len", "--prefix-repetition-prefix-len", type=int, default=0,
                      help="tokens (or words) that every prompt starts with, before its own --input-len; "
                           "prefix-repetition: the length of each prefix")
    data.add_argument("--num-prefixes", "--prefix-repetition-num-prefixes", type=int, default=10,
                      help="prefix-repetition: distinct prefixes, each used by an equal share of the prompts")
    data.add_argument("--sharegpt-output-len", type=int, help="sharegpt: this output length for every request")
    req = bs.add_argument_group("requests")
    req.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    req.add_argument("--api-key")
    req.add_argument("--temperature", type=float, default=0.0,
                     help="of every request (0: greedy; above 0 the server samples, as most real traffic does)")
    req.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="generate the full output length whatever the model says (the same work on every server)")
    out = bs.add_argument_group("results")
    out.add_argument("--percentiles", "--metric-percentiles", type=float_list, default=(50.0, 90.0, 99.0),
                     metavar="P[,P2,...]", help="of TTFT, TPOT, ITL and E2EL, in the table and the saved result")
    out.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                     help="SLOs (ttft, tpot, e2el in ms): also report requests/s that met every one")
    out.add_argument("--save-result", metavar="FILE",
                     help="write vLLM's result JSON (one line per level, as its --append-result)")
    out.add_argument("--label", help="the saved result's label (the legend of `gptoss bench plot`)")


def add_plot_flags(bp: argparse.ArgumentParser) -> None:
    bp.add_argument("files", nargs="+", metavar="FILE", help="results saved by gptoss or vLLM bench serve")
    bp.add_argument("-o", "--output", required=True, help="the PNG to write")
    bp.add_argument("--title", help="instead of the model, date and machine of the results")
    bp.add_argument("--machine", help="the machine to name in the title (vLLM's results do not say)")


def run_serve(args: argparse.Namespace) -> str:
    from cluster.bench.datasets import DatasetConfig
    from cluster.bench.loadgen import ServeOptions, bench_serve
    from cluster.bench.results import parse_goodput

    chat = args.endpoint.endswith("chat/completions")
    prompt_type = args.prompt_type or ("text" if chat else "tokens")
    if chat and prompt_type == "tokens":
        raise commands.UsageError("--endpoint /v1/chat/completions takes text prompts: --prompt-type text")
    if min(args.concurrency or [1]) < 1 or args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise commands.UsageError("concurrency, --num-prompts, --input-len and --output-len must be positive")
    if args.shared_prefix < 0 or not 0.0 <= args.temperature <= 2.0:
        raise commands.UsageError("--shared-prefix must be >= 0 and --temperature in [0, 2]")
    if (args.request_rate is not None and min(args.request_rate or [0]) <= 0) or args.burstiness <= 0:
        raise commands.UsageError("--request-rate and --burstiness must be positive (inf: all at once)")
    if not all(0 < p < 100 for p in args.percentiles) or not args.percentiles:
        raise commands.UsageError("--percentiles must lie between 0 and 100")
    dataset = DatasetConfig(args.dataset_name, args.dataset_path, args.num_prompts, args.input_len, args.output_len,
                            args.random_range_ratio, prompt_type, args.shared_prefix, args.num_prefixes,
                            args.sharegpt_output_len, args.seed)
    options = ServeOptions(args.url, dataset, args.model, args.endpoint, args.api_key, args.temperature,
                           args.ignore_eos, args.request_rate, args.burstiness, args.concurrency, args.percentiles,
                           parse_goodput(args.goodput) if args.goodput else None, args.save_result, args.label)
    return bench_serve(options, _count_tokens if args.dataset_name in ("sharegpt", "text") else None)


def _count_tokens(text: str) -> int:
    from model_shards.tokenizer import encode

    return len(encode(text))


def run_plot(args: argparse.Namespace) -> str:
    from cluster.bench.plot import plot_load_curve

    try:
        path = plot_load_curve(args.files, args.output, args.title, args.machine)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("matplotlib"):
            raise
        raise commands.UsageError("bench plot needs matplotlib: pip install 'gptoss-ray[plot]'") from None
    return f"wrote {path} ({len(args.files)} series)"
