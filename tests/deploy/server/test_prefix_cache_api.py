"""What clients see of the prefix cache and of n > 1: `cached_tokens` in every route's usage, the
Prometheus counters, and choices that each equal a single request with that choice's seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from cluster.engine.engine import Engine
from cluster.launch import EngineArgs, build_engine
from tests.deploy.conftest import MODEL, client_for, metric_values
from tests.deploy.server.test_api_behaviour import sse

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK

PREFIX = torch.randint(0, 199_998, (600,), generator=torch.Generator().manual_seed(8)).tolist()
SYSTEM = "You answer questions about the weather in a long and careful way. " * 30


@pytest.fixture(scope="module")
def caching_engine(tiny_hf: Path, vocab: Path) -> Iterator[Engine]:
    engine = build_engine(EngineArgs.from_options(model=str(tiny_hf), engine="local", dtype="float32",
                                                  kv_cache_tokens=16384, max_model_len=1024))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(caching_engine: Engine) -> TestClient:
    return client_for(caching_engine, default_max_tokens=8)


def complete(client: TestClient, **fields: object) -> dict:
    body = {"model": MODEL, "max_tokens": 6, "ignore_eos": True, "return_token_ids": True, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_cached_tokens_in_completions_chat_and_responses(client: TestClient) -> None:
    before = client.get("/metrics").text
    assert complete(client, prompt=PREFIX + [1, 2, 3])["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    usage = complete(client, prompt=PREFIX + [4, 5])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 592 and usage["prompt_tokens"] == 602
    after = client.get("/metrics").text
    hits = sum(metric_values(after, "gptoss_prefix_cache_hits_total").values()) - \
        sum(metric_values(before, "gptoss_prefix_cache_hits_total").values())
    queries = sum(metric_values(after, "gptoss_prefix_cache_queries_total").values()) - \
        sum(metric_values(before, "gptoss_prefix_cache_queries_total").values())
    assert hits == 592 and queries == 603 + 602
    assert 0 < sum(metric_values(after, "gptoss_kv_cache_cached_ratio").values()) <= 1

    def chat(question: str) -> dict:
        return client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": question}]}).json()

    chat("Is it raining?")
    assert chat("Is it sunny?")["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256

    def respond(question: str) -> dict:
        return client.post("/v1/responses", json={"model": MODEL, "instructions": SYSTEM, "input": question,
                                                  "max_output_tokens": 4}).json()

    respond("Will it snow?")
    assert respond("Will it hail?")["usage"]["input_tokens_details"]["cached_tokens"] >= 256


def test_completions_n_2_equals_single_requests_with_each_seed(client: TestClient) -> None:
    prompt = PREFIX[:40]
    both = complete(client, prompt=prompt, n=2, temperature=1.0, seed=21)
    singles = [complete(client, prompt=prompt, temperature=1.0, seed=s)["choices"][0] for s in (21, 22)]
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["token_ids"] for c in both["choices"]] == [c["token_ids"] for c in singles]
    assert both["choices"][0]["token_ids"] != both["choices"][1]["token_ids"]
    assert both["usage"]["prompt_tokens"] == 40 and both["usage"]["completion_tokens"] == 12
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "n": 2, "temperature": 1.0,
                                                    "seed": 21, "max_tokens": 6, "ignore_eos": True,
                                                    "return_token_ids": True, "stream": True})
    pieces = [c["choices"][0] for c in sse(streamed.text) if c["choices"]]
    for i, single in enumerate(singles):
        assert [t for p in pieces if p["index"] == i for t in p["token_ids"]] == single["token_ids"]
    # two prompts, two choices each: prompt-major indices
    grid = complete(client, prompt=[prompt, PREFIX[:20]], n=2, temperature=1.0, seed=21)
    assert [c["token_ids"] for c in grid["choices"][:2]] == [c["token_ids"] for c in singles]


def test_chat_n_2_streamed_and_not_equals_single_requests(client: TestClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8,
            "temperature": 1.0}

    def text(message: dict) -> tuple[str | None, str | None]:
        return message.get("content") or None, message.get("reasoning") or None

    both = client.post("/v1/chat/completions", json={**body, "n": 2, "seed": 5}).json()
    singles = [client.post("/v1/chat/completions", json={**body, "seed": s}).json()["choices"][0] for s in (5, 6)]
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [text(c["message"]) for c in both["choices"]] == [text(c["message"]) for c in singles]
    assert both["usage"]["completion_tokens"] == 16
    streamed = client.post("/v1/chat/completions", json={**body, "n": 2, "seed": 5, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    chunks = sse(streamed.text)
    for i, single in enumerate(singles):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        content = "".join(d.get("content") or "" for d in deltas)
        reasoning = "".join(d.get("reasoning") or "" for d in deltas)
        assert (content or None, reasoning or None) == text(single["message"])
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == i and
                  c["choices"][0]["finish_reason"]]
        assert len(finals) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 16 and json.dumps(chunks[-1]["choices"]) == "[]"
