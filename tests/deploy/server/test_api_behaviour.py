"""What the routes return for good input: text and tokens that agree, stop strings, SSE framing,
batched prompts, the Responses shape, and metrics that move."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from deploy.server.text import StopFilter
from model_shards.tokenizer import decode
from tests.deploy.conftest import MODEL, metric_values

PROMPT = [1000, 2000, 3000, 4000, 5000]


def sse(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def greedy(client: TestClient, **fields: object) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_text_tokens_and_logprobs_agree(client: TestClient) -> None:
    out = greedy(client, logprobs=3)
    choice = out["choices"][0]
    assert choice["text"] == decode(choice["token_ids"]) and choice["prompt_token_ids"] == PROMPT
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-6 for top, chosen in zip(lp["top_logprobs"],
                                                                                            lp["token_logprobs"]))
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                            "prompt_tokens_details": {"cached_tokens": 0}}  # 5 tokens: no complete block to reuse


def test_streaming_matches_non_streaming(client: TestClient) -> None:
    whole = greedy(client)["choices"][0]
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                     "ignore_eos": True, "stream": True, "return_token_ids": True,
                                                     "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse(response.text)
    pieces = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert [t for p in pieces for t in p.get("token_ids", [])] == whole["token_ids"]
    assert pieces[-1]["finish_reason"] == "length" and pieces[0]["prompt_token_ids"] == PROMPT
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []


def test_stop_strings_cut_text_and_generation(client: TestClient) -> None:
    text = greedy(client)["choices"][0]["text"]
    stop = text[4:7]
    cut = greedy(client, stop=[stop, "never-appears"])["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["token_ids"]) < 12  # generation stopped, not just the text
    assert StopFilter(["abc"]).push("xxab") == "xx"  # a possible start of a stop string is held back


def test_logit_bias_steers_the_choice(client: TestClient) -> None:
    forced = greedy(client, logit_bias={"42": 100.0}, max_tokens=3)["choices"][0]
    assert forced["token_ids"] == [42, 42, 42]


def test_batched_prompts_are_independent_choices(client: TestClient) -> None:
    together = greedy(client, prompt=[PROMPT, [7, 8, 9]])["choices"]
    assert [c["index"] for c in together] == [0, 1]
    assert together[0]["token_ids"] == greedy(client)["choices"][0]["token_ids"]
    assert together[1]["token_ids"] == greedy(client, prompt=[7, 8, 9])["choices"][0]["token_ids"]


def test_chat_stream_is_well_formed(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "seed": 1})
    chunks = sse(response.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    logprobs = [entry for c in chunks if c["choices"] for entry in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    assert len(logprobs) == 6


def test_chat_non_streaming_shape(client: TestClient) -> None:
    out = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                     "max_completion_tokens": 5, "seed": 3}).json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"


def test_responses_api(client: TestClient) -> None:
    out = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "instructions": "Be brief.",
                                              "max_output_tokens": 5, "reasoning": {"effort": "low"}}).json()
    assert out["object"] == "response" and out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][-1]["type"] == "message" and out["output"][-1]["content"][0]["type"] == "output_text"
    assert out["usage"]["output_tokens"] == 5


def test_metrics_move(client: TestClient) -> None:
    before = client.get("/metrics").text
    greedy(client, max_tokens=3)
    after = client.get("/metrics").text
    assert after.startswith("# HELP") or "# HELP" in after
    count = "gptoss_time_to_first_token_seconds_count"
    assert sum(metric_values(after, count).values()) == sum(metric_values(before, count).values()) + 1
    generated = "gptoss_generation_tokens_total"
    assert sum(metric_values(after, generated).values()) - sum(metric_values(before, generated).values()) == 3
