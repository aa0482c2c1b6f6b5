"""Shared pieces of the Kubernetes tests: the manifests, and one running server whose Ray metrics
export stands in for a pod's metrics port."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.conftest import REPO, SHARED, need_shared
from tests.deploy.conftest import free_port, gptoss_serve

K8S = REPO / "k8s"


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="session")
def kuberay_dir() -> Path:
    return need_shared(SHARED / "kuberay", "validating RayService manifests")


@pytest.fixture(scope="module")
def metrics_server(tiny_hf: Path, vocab: Path) -> Iterator[dict[str, Any]]:
    """gptoss serve with Ray's metrics export on a known port, after a few requests, once the
    gptoss series have reached that export."""
    port = free_port()
    args = ["--model", str(tiny_hf), "--served-model-name", "tiny", "--engine", "cluster", "--expert-shards", "2",
            "--dtype", "float32", "--max-model-len", "256", "--kv-cache-tokens", "4096",
            "--metrics-export-port", str(port)]
    with gptoss_serve(args, vocab) as (url, _):
        for i in range(4):
            response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3 + i],
                                                                 "max_tokens": 6, "ignore_eos": True}, timeout=60)
            assert response.status_code == 200
        exported = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = httpx.get(exported, timeout=10).text
            if "ray_gptoss_time_to_first_token_seconds_bucket" in text and "ray_gptoss_expert_tokens_total" in text:
                break
            time.sleep(1)
        yield {"url": url, "metrics_port": port, "exported": exported}
