"""A real server with a tiny queue: overload gets 429 with Retry-After, admitted requests complete;
SIGTERM drains what is in flight and refuses what comes after."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.deploy.conftest import gptoss_serve

BODY = {"model": "tiny", "prompt": [11, 22, 33], "max_tokens": 60, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def small_server(tiny_hf: Path, vocab: Path) -> Iterator[tuple[str, object]]:
    args = ["--model", str(tiny_hf), "--served-model-name", "tiny", "--engine", "local", "--dtype", "float32",
            "--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "256", "--kv-cache-tokens", "4096",
            "--drain-timeout", "30"]
    with gptoss_serve(args, vocab) as served:
        yield served


def test_overload_gets_429_with_retry_after(small_server: tuple[str, object]) -> None:
    url, _ = small_server
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=BODY, timeout=120), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60  # admitted requests complete


def test_shutdown_drains_in_flight_requests(small_server: tuple[str, object]) -> None:
    url, proc = small_server
    result: dict[str, object] = {}
    started = threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "max_tokens": 120, "stream": True},
                          timeout=120) as response:
            chunks, last = [], ""
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(line)
                    started.set()
                last = line or last
            result.update(status=response.status_code, chunks=chunks, last=last)

    worker = threading.Thread(target=long_request)
    worker.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    worker.join(120)
    assert result["status"] == 200 and result["last"] == "data: [DONE]"
    last = json.loads(result["chunks"][-1][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"  # all 120 tokens, not cut off
    proc.wait(timeout=60)  # type: ignore[attr-defined]
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/v1/completions", json=BODY, timeout=5)
