"""Every manifest in k8s/ against its schema: RayService and RayCluster against the KubeRay v1.7
CRDs (with the API server's defaults applied, and unknown fields refused as kubectl --validate=strict
does), core kinds against the Kubernetes schemas. A broken copy must fail."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s.conftest import manifests

K8S_VERSION = "1.30"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CORE_KINDS = {"Secret", "NetworkPolicy", "Service", "ConfigMap", "PersistentVolumeClaim"}


@functools.lru_cache(maxsize=4)
def crd_schema(kuberay_dir: Path, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((kuberay_dir / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _closed(version["schema"]["openAPIV3Schema"])


def _closed(schema: Any) -> Any:
    """Structural schemas prune unknown fields; kubectl's strict validation reports them. Make
    objects with declared properties refuse others (unless they preserve unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


def apply_defaults(schema: dict[str, Any], obj: Any) -> None:
    """What the API server does before validation: fill declared defaults into present objects."""
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(schema["items"], item)


def validate_crd(kuberay_dir: Path, doc: dict[str, Any]) -> dict[str, Any]:
    schema = crd_schema(kuberay_dir, doc["kind"])
    obj = copy.deepcopy(doc)
    apply_defaults(schema, obj)
    jsonschema.Draft7Validator(schema).validate(obj)
    return obj


DOCS = manifests()


def test_there_is_something_to_validate() -> None:
    kinds = [doc["kind"] for _, doc in DOCS]
    assert kinds.count("RayService") == 4
    assert {"NetworkPolicy", "PodMonitor", "Secret"} <= set(kinds)


@pytest.mark.parametrize("path, doc", [d for d in DOCS if d[1]["kind"] in CRD_FILES],
                         ids=lambda x: x.name if isinstance(x, Path) else "")
@pytest.mark.slow
def test_kuberay_resources_match_the_crd(kuberay_dir: Path, path: Path, doc: dict[str, Any]) -> None:
    defaulted = validate_crd(kuberay_dir, doc)
    groups = defaulted["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(g["numOfHosts"] == 1 for g in groups)  # a default the API server fills in


@pytest.mark.parametrize("path, doc", [d for d in DOCS if d[1]["kind"] in CORE_KINDS],
                         ids=lambda x: x.name if isinstance(x, Path) else "")
def test_core_kinds_match_the_kubernetes_schemas(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod() -> None:
    monitor = next(doc for _, doc in DOCS if doc["kind"] == "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for _, doc in DOCS:
        if doc["kind"] == "RayService":
            for container in _containers(doc):
                assert {"containerPort": 8080, "name": "metrics"} in container["ports"]


@pytest.mark.parametrize("broken", ["wrong type", "unknown field", "missing template", "bad core kind"])
def test_a_broken_copy_fails(kuberay_dir: Path, broken: str) -> None:
    service = copy.deepcopy(next(doc for _, doc in DOCS if doc["kind"] == "RayService"))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    if broken == "wrong type":
        group["replicas"] = "one"
    elif broken == "unknown field":
        group["replicaz"] = 2
    elif broken == "missing template":
        del group["template"]
    else:
        policy = copy.deepcopy(next(doc for _, doc in DOCS if doc["kind"] == "NetworkPolicy"))
        policy["spec"]["ingress"][0]["ports"][0]["port"] = {"number": 8000}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        return
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(kuberay_dir, service)


def _containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


@pytest.mark.parametrize("path, doc", [d for d in DOCS if d[1]["kind"] == "RayService"],
                         ids=lambda x: x.name if isinstance(x, Path) else "")
def test_pods_are_locked_down_and_sized(path: Path, doc: dict[str, Any]) -> None:
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["securityContext"]["runAsUser"] != 0
    for container in _containers(doc):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(doc)]
    assert any(gpus) == ("cpu" not in path.name)
    serving = [c for c in _containers(doc) if c.get("readinessProbe")]
    assert serving and all(c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000} for c in serving)


def test_the_autoscaling_service_scales_actors_within_its_worker_groups_room() -> None:
    """The in-tree autoscaler is on; the actors a resize adds ask for the resource that only the
    scalable group advertises, and the groups' room covers the app's maxima."""
    path, doc = next((p, d) for p, d in DOCS if p.name == "rayservice-cpu-autoscale.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["autoscale"] is True
    assert args["attention_replica_resources"] == args["expert_shard_resources"] == {"gptoss_actor": 1.0}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    scalable = groups["actors"]
    assert scalable["minReplicas"] == 0 < scalable["maxReplicas"]
    room = sum(int(g["resources"].get("gptoss_actor", 0)) * g["maxReplicas"] for g in groups.values())
    assert room >= args["max_attention_replicas"] + args["max_expert_shards"]
    start = args["attention_replicas"] + args["expert_shards"]
    assert int(groups["serve"]["resources"]["gptoss_actor"]) == start  # the start fits without scaling
    assert args["min_attention_replicas"] <= args["attention_replicas"] <= args["max_attention_replicas"]
    assert args["min_expert_shards"] <= args["expert_shards"] <= args["max_expert_shards"]
