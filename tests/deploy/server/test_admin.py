"""The admin routes: POST /admin/scale resizes the serving plane (answered when the new plane serves)
and GET /admin/topology lists its actors; both behind the API key; the metrics show the counts and
every resize."""

from __future__ import annotations

from pathlib import Path

from cluster.engine.engine import Engine
from tests.deploy.conftest import client_for


def test_the_local_engine_lists_itself_and_refuses_to_resize(local_engine: Engine) -> None:
    client = client_for(local_engine)
    topology = client.get("/admin/topology").json()
    assert topology["attention_replicas"] == 1 and topology["expert_shards"] == 1
    assert [a["role"] for a in topology["actors"]] == ["local"]
    refused = client.post("/admin/scale", json={"attention_replicas": 2})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "resize_refused"
    bad = client.post("/admin/scale", json={"attention_replicas": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "attention_replicas"
    assert client.post("/admin/scale", json={"replicas": 2}).status_code == 400  # unknown field
    metrics = client.get("/metrics").text
    assert 'gptoss_attention_replicas{model_name="tiny"} 1.0' in metrics
    assert 'gptoss_expert_shards{model_name="tiny"} 1.0' in metrics


def test_the_admin_routes_need_the_api_key(local_engine: Engine) -> None:
    client = client_for(local_engine, api_key="sesame")
    assert client.get("/admin/topology").status_code == 401
    assert client.post("/admin/scale", json={}).status_code == 401
    ok = client.get("/admin/topology", headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200


def test_scaling_a_cluster_over_http(ray_session, tiny_hf: Path) -> None:
    from cluster.launch import EngineArgs, build_engine

    engine = build_engine(EngineArgs.from_options(model=str(tiny_hf), dtype="float32", expert_shards=2,
                                                  kv_cache_tokens=2048))
    try:
        client = client_for(engine)
        same = client.post("/admin/scale", json={"expert_shards": 2})
        assert same.status_code == 200 and same.json()["seconds"] == 0.0
        up = client.post("/admin/scale", json={"attention_replicas": 2})
        assert up.status_code == 200, up.text
        assert up.json()["attention_replicas"] == 2 and up.json()["previous"]["attention_replicas"] == 1
        topology = client.get("/admin/topology").json()
        roles = [(a["role"], a["index"]) for a in topology["actors"]]
        assert roles == [("attention_replica", 0), ("attention_replica", 1), ("router", 0), ("expert_shard", 0),
                         ("expert_shard", 1)]
        assert all(a["pid"] and a["node"] for a in topology["actors"])
        shards = [a["experts"] for a in topology["actors"] if a["role"] == "expert_shard"]
        assert shards[0][0] == 0 and shards[0][1] == shards[1][0]
        failed = client.post("/admin/scale", json={"expert_shards": 99})
        assert failed.status_code == 400 and "between 1 and" in failed.json()["error"]["message"]
        down = client.post("/admin/scale", json={"attention_replicas": 1})
        assert down.status_code == 200 and down.json()["attention_replicas"] == 1
        metrics = client.get("/metrics").text
        assert 'gptoss_attention_replicas{model_name="tiny"} 1.0' in metrics
        assert 'gptoss_resizes_total{model_name="tiny",outcome="ok",reason="manual"} 2.0' in metrics
        assert 'gptoss_resize_duration_seconds_count{model_name="tiny",reason="manual"} 2.0' in metrics
    finally:
        engine.shutdown()
