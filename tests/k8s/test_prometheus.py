"""A real Prometheus (Debian's package) scrapes a running gptoss serve; a TTFT quantile comes back
through its HTTP query API, and every dashboard expression evaluates there."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import IN_CI
from tests.deploy.conftest import free_port
from tests.k8s.test_dashboard import expressions

TTFT = "histogram_quantile(0.5, sum by (le) (ray_gptoss_time_to_first_token_seconds_bucket))"


@pytest.fixture(scope="module")
def prometheus(metrics_server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        message = "needs the prometheus binary (Debian package prometheus; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gptoss-ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_server['metrics_port']}']}}]\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(root / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_ttft_quantile_through_prometheus(prometheus: str, metrics_server: dict[str, Any]) -> None:
    deadline = time.monotonic() + 90
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        httpx.post(f"{metrics_server['url']}/v1/completions",
                   json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3}, timeout=60)
        result = query(prometheus, TTFT)
        if result and not math.isnan(float(result[0]["value"][1])):
            break
        time.sleep(1)
    assert result, "Prometheus has no TTFT series"
    seconds = float(result[0]["value"][1])
    assert 0 < seconds < 60


def test_every_dashboard_expression_evaluates(prometheus: str) -> None:
    for expr in expressions():
        if expr.startswith("label_values"):
            continue  # a Grafana function, not PromQL
        promql = expr.replace("$__rate_interval", "1m").replace('model_name=~"$model"', 'model_name=~".+"')
        query(prometheus, promql)
