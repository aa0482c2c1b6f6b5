"""The server's options, beside the engine's (cluster/config.py): one schema for `gptoss serve`'s
flags and for the RayService application args (`deploy.app:build_app`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from cluster.config import ClusterConfig, EngineConfig, ModelConfig, Resources
from cluster.launch import EngineArgs
from cluster.options import OptionValue, check_options, flat_values, option, split_values

RANDOM_MODEL_NAME = "gptoss-random-tiny"


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str | None = option(None, "the model name clients use (default: --model, or "
                                                 f"{RANDOM_MODEL_NAME} for the random model)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 routes", secret=True)
    api_key_env: str | None = option(None, "read the API key from this environment variable (on Kubernetes: set "
                                           "from a Secret)")
    request_timeout_s: float | None = option(None, "seconds before a request ends with 408 (default: none)", gt=0)
    max_body_bytes: int = option(4 << 20, "largest request body in bytes (413 beyond)", ge=1024)
    default_max_tokens: int = option(4096, "max_tokens of chat and responses requests that give none", ge=1)
    drain_timeout_s: float = option(30.0, "seconds in-flight requests get at shutdown", ge=0)
    docs: bool = option(False, "serve the interactive API docs at /docs and /redoc (their pages load scripts "
                               "from a CDN); /openapi.json is always served")
    ingress_num_cpus: float = option(1.0, "CPUs of the Serve replica that runs the engine", ge=0)
    ingress_resources: Resources = option({}, "custom Ray resources that place the Serve replica")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class LaunchOptions:
    """What only the command line sets: where this process serves and which Ray it uses. (In a
    RayService, KubeRay's Serve config and cluster decide these.)"""

    host: str = option("127.0.0.1", "address to serve HTTP on")
    port: int = option(8000, "port to serve HTTP on", ge=1, le=65535)
    ray_address: str | None = option(None, "an existing Ray cluster (default: start Ray in this process)")
    metrics_export_port: int | None = option(None, "port of Ray's metrics export when Ray starts here "
                                                   "(Prometheus scrapes ray_gptoss_* there)", ge=1, le=65535)
    direct_ingress: bool = option(True, "when Ray starts here, the Serve replica itself answers on --port (Ray "
                                        "Serve's direct ingress), not Ray Serve's proxy")

    def __post_init__(self) -> None:
        check_options(self)


APP_GROUPS = (ModelConfig, EngineConfig, ClusterConfig, ServerConfig)


@dataclass(frozen=True)
class AppConfig:
    """Every option of the served application."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_options(cls, values: dict[str, OptionValue]) -> AppConfig:
        return cls(*split_values(values, *APP_GROUPS))

    def options(self) -> dict[str, OptionValue]:
        return flat_values(self.model, self.engine, self.cluster, self.server)

    def engine_args(self) -> EngineArgs:
        return EngineArgs(self.model, self.engine, self.cluster)

    def model_name(self) -> str:
        """What clients call the model: --served-model-name, else a hub id as given, or a checkpoint
        directory's name (never its path: paths stay on the server)."""
        if self.server.served_model_name:
            return self.server.served_model_name
        if not self.model.model:
            return RANDOM_MODEL_NAME
        path = Path(self.model.model).expanduser()
        return path.resolve().name if path.is_dir() else self.model.model

    def with_random_model(self, path: str) -> AppConfig:
        """No model given: serve the random-weight checkpoint at `path`, under RANDOM_MODEL_NAME."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, model=path),
                                   server=dataclasses.replace(self.server, served_model_name=self.model_name()))
