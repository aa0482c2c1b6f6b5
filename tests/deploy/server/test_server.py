"""A real `gptoss serve` (Ray Serve, HTTP on localhost, the cluster engine) driven by the openai SDK."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from deploy.cli.main import main
from deploy.server.metrics import STATS_MAX_AGE_S
from tests.deploy.conftest import gptoss_serve, metric_values

openai = pytest.importorskip("openai")
NAME = "tiny"
IDS = [1000, 2000, 3000, 4000, 5000, 6000, 7000]
METRICS = ["gptoss_time_to_first_token_seconds", "gptoss_inter_token_latency_seconds",
           "gptoss_e2e_request_latency_seconds", "gptoss_request_queue_time_seconds", "gptoss_prompt_tokens_total",
           "gptoss_generation_tokens_total", "gptoss_requests_total", "gptoss_expert_tokens_total",
           "gptoss_num_requests_running", "gptoss_num_requests_waiting", "gptoss_kv_cache_usage_ratio",
           "gptoss_expert_shard_step_seconds", "gptoss_expert_shard_tokens_total", "gptoss_expert_shard_imbalance",
           "gptoss_expert_recent_shard_imbalance", "gptoss_expert_rebalances_total"]


@pytest.fixture(scope="module")
def server(tiny_hf: Path, vocab: Path) -> Iterator[str]:
    args = ["--model", str(tiny_hf), "--served-model-name", NAME, "--engine", "cluster", "--attention-replicas", "2",
            "--expert-shards", "2", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-tokens", "8192"]
    with gptoss_serve(args, vocab) as (url, _):
        yield url


@pytest.fixture(scope="module")
def sdk(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_with_the_sdk(sdk) -> None:
    out = sdk.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hello"}],
                                      max_tokens=8, seed=1, reasoning_effort="low")
    assert out.object == "chat.completion" and out.model == NAME
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    assert isinstance(out.choices[0].message.content, str)


def test_chat_streaming_with_the_sdk(sdk) -> None:
    chunks = list(sdk.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=6, stream=True, stream_options={"include_usage": True},
                                              seed=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_token_ids_logprobs_and_return_token_ids(sdk) -> None:
    out = sdk.completions.create(model=NAME, prompt=IDS, max_tokens=8, temperature=0, logprobs=2,
                                 extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = out.choices[0]
    assert len(choice.logprobs.token_logprobs) == 8 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert choice.model_extra["prompt_token_ids"] == IDS and len(choice.model_extra["token_ids"]) == 8


def test_greedy_http_equals_gptoss_generate(sdk, tiny_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    http = sdk.completions.create(model=NAME, prompt=IDS, max_tokens=10, temperature=0, logprobs=1,
                                  extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
    assert main(["generate", "--model", str(tiny_hf), "--prompt-ids", ",".join(map(str, IDS)), "--max-tokens", "10",
                 "--temperature", "0", "--dtype", "float32", "--ignore-eos", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert http.model_extra["token_ids"] == cli["token_ids"]
    assert max(abs(a - b) for a, b in zip(http.logprobs.token_logprobs, cli["logprobs"])) < 1e-4


def _scrape(server: str) -> str:
    return httpx.get(f"{server}/metrics", timeout=30).text


def test_client_disconnect_aborts_the_request(server: str) -> None:
    baseline = _scrape(server)
    aborted_before = metric_values(baseline, "gptoss_requests_total").get('{finished_reason="abort",model_name="tiny"}', 0)
    body = {"model": NAME, "prompt": IDS, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # generation is under way
        assert any(line.startswith("data: {") for line in received)
        running = metric_values(_scrape(server), "gptoss_num_requests_running")
        assert sum(running.values()) == 1
    closed = time.monotonic()
    while time.monotonic() - closed < 1.0:
        text = _scrape(server)
        if sum(metric_values(text, "gptoss_num_requests_running").values()) == 0 and \
                sum(metric_values(text, "gptoss_kv_cache_usage_ratio").values()) == 0:
            break
        time.sleep(0.05)
    assert time.monotonic() - closed < 1.0, "the request was not aborted within 1 s"
    aborted = metric_values(text, "gptoss_requests_total").get('{finished_reason="abort",model_name="tiny"}', 0)
    assert aborted == aborted_before + 1


def test_metrics_are_all_there_and_move(server: str, sdk) -> None:
    before = _scrape(server)
    sdk.completions.create(model=NAME, prompt=IDS, max_tokens=4, extra_body={"ignore_eos": True})
    time.sleep(STATS_MAX_AGE_S + 0.1)  # a scrape may reuse actor stats this old
    after = _scrape(server)
    for name in METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in after, name
    for name in ("gptoss_time_to_first_token_seconds_count", "gptoss_e2e_request_latency_seconds_count",
                 "gptoss_request_queue_time_seconds_count", "gptoss_inter_token_latency_seconds_count",
                 "gptoss_prompt_tokens_total", "gptoss_generation_tokens_total", "gptoss_requests_total",
                 "gptoss_expert_tokens_total", "gptoss_expert_shard_step_seconds_count",
                 "gptoss_expert_shard_tokens_total"):
        assert sum(metric_values(after, name).values()) > sum(metric_values(before, name).values()), name
    assert 'model_name="tiny"' in metric_values(after, "gptoss_requests_total").popitem()[0]
    assert len(metric_values(after, "gptoss_expert_shard_step_seconds_count")) == 2  # one series per shard
    assert len(metric_values(after, "gptoss_expert_shard_tokens_total")) == 2
    imbalance = metric_values(after, "gptoss_expert_shard_imbalance")
    assert len(imbalance) == 4 + 1 and all(v >= 1.0 for v in imbalance.values())  # 4 layers and the whole pass
    assert list(metric_values(after, "gptoss_expert_recent_shard_imbalance").values())[0] >= 1.0
    assert list(metric_values(after, "gptoss_expert_rebalances_total").values()) == [0.0]  # --eplb-interval is off


def test_bench_serve_against_the_server(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--url", f"{server}/v1", "--concurrency", "1,2", "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["failed"] == 0 and level["output_throughput"] > 0
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"] <= level["e2el_ms"]["p99"]
