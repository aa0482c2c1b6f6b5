"""Each RayService's serveConfigV2 imports and builds, from exactly its own args (the model swapped
for a local random checkpoint)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve import Application

from tests.k8s.conftest import manifests

SERVICES = [(path, doc) for path, doc in manifests() if doc["kind"] == "RayService"]


@pytest.mark.parametrize("path, doc", SERVICES, ids=[p.name for p, _ in SERVICES])
def test_serve_config_builds(path: Path, doc: dict[str, Any], tiny_hf: Path) -> None:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert config["http_options"]["port"] == 8000
    for application in config["applications"]:
        module, _, attribute = application["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        args = dict(application["args"])
        if "model" in args:
            args["model"] = str(tiny_hf)
        assert isinstance(builder(args), Application)
