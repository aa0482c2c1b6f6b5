"""The Grafana dashboard asks only for metrics a running server really exports (where the PodMonitor
scrapes them: Ray's metrics export, names prefixed ray_)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.k8s.conftest import K8S

DASHBOARD = json.loads((K8S / "grafana" / "gptoss-dashboard.json").read_text())
METRIC = re.compile(r"\b(ray_gptoss_[a-z0-9_]+)")


def expressions() -> list[str]:
    panels = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    variables = [v["definition"] for v in DASHBOARD["templating"]["list"] if v.get("definition")]
    return panels + variables


def test_dashboard_covers_what_operators_watch() -> None:
    titles = " ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for topic in ("time to first token", "inter-token", "tokens per second", "running and waiting", "kv cache",
                  "per expert", "shard step", "scaling", "resize duration"):
        assert topic in titles
    assert any(p["type"] == "heatmap" for p in DASHBOARD["panels"])


def test_every_expression_names_exported_metrics(metrics_server: dict[str, Any]) -> None:
    text = httpx.get(metrics_server["exported"], timeout=10).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_gptoss_")}
    used = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert used, "the dashboard names no gptoss metric"
    assert all(METRIC.search(expr) for expr in expressions())
    assert used <= exported, sorted(used - exported)
