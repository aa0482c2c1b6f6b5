"""Fixtures for the HTTP layer: the FastAPI app in process over a local engine (fast; error
contract and behaviour), and real `gptoss serve` processes (Ray Serve, HTTP on localhost)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from cluster.engine.engine import Engine
from cluster.launch import EngineArgs, build_engine
from deploy.server.api import ApiSettings, create_api

MODEL = "tiny"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def local_engine(tiny_hf: Path, vocab: Path) -> Iterator[Engine]:
    engine = build_engine(EngineArgs.from_options(model=str(tiny_hf), engine="local", dtype="float32",
                                                  kv_cache_tokens=8192, max_model_len=MAX_MODEL_LEN, max_waiting=64))
    yield engine
    engine.shutdown()


def client_for(engine: Engine, **settings: object) -> TestClient:
    app = create_api(engine, ApiSettings(MODEL, **settings))  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="session")
def client(local_engine: Engine) -> TestClient:
    return client_for(local_engine, default_max_tokens=16)


def sdk_for(client: TestClient):
    """The openai SDK over an in-process app (no network, no retries)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def sdk(client: TestClient):
    """The SDK over the in-process server of `client` (tests over a real server define their own)."""
    return sdk_for(client)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gptoss_serve(args: list[str], vocab: Path, timeout_s: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `gptoss serve` on a free port; yields (base URL, process). SIGTERM at the end."""
    port = free_port()
    exe = shutil.which("gptoss") or str(Path(sys.executable).parent / "gptoss")
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"gptoss-serve-{port}.log", "w+")
    proc = subprocess.Popen([exe, "--vocab-dir", str(vocab), "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "ready on" in line:
                break
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"gptoss serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        else:
            pytest.fail("gptoss serve did not become ready")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric family from Prometheus text: {label string: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out
