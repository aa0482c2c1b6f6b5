"""The same metrics through Ray's own metrics export (what a Prometheus in a Ray cluster scrapes)."""

from __future__ import annotations

import time

import httpx
import pytest

from cluster.engine.engine import Engine
from cluster.engine.events import RequestTimes
from deploy.server.metrics import RayExport, ServerMetrics
from model_shards.sampling import SamplingParams
from tests.conftest import RAY_METRICS_PORT


def test_ray_export_carries_the_gptoss_metrics(ray_session, local_engine: Engine) -> None:
    if not RAY_METRICS_PORT:
        pytest.skip("Ray was started elsewhere, on a metrics port this test does not know")
    metrics = ServerMetrics(local_engine, "tiny-export")
    done = local_engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    times = RequestTimes(arrival=0.0, scheduled=0.01, first_token=0.05, finished=0.2, token_times=[0.05, 0.1, 0.2])
    metrics.request_finished(3, len(done.token_ids), done.finish_reason, times)
    export = RayExport(metrics.registry, period_s=0.5)
    wanted = {"ray_gptoss_requests_total", "ray_gptoss_generation_tokens_total", "ray_gptoss_num_requests_running",
              "ray_gptoss_kv_cache_usage_ratio", "ray_gptoss_expert_tokens_total",
              "ray_gptoss_time_to_first_token_seconds_bucket"}
    found: set[str] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not wanted <= found:
            time.sleep(1)
            try:
                text = httpx.get(f"http://127.0.0.1:{RAY_METRICS_PORT[0]}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            found = {line.split("{")[0] for line in text.splitlines() if 'model_name="tiny-export"' in line}
    finally:
        export.stop()
    assert wanted <= found, sorted(wanted - found)
