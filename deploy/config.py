"""The server's options, beside the engine's (cluster/config.py): one schema for `gptoss serve`'s
flags and for the RayService application args (`deploy.app:build_app`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.config import ClusterConfig, EngineConfig, ModelConfig, Resources
from cluster.launch import EngineArgs
from cluster.options import OptionValue, check_options, flat_values, option, split_values
from model_shards.random_checkpoint import default_random_model
from model_shards.tokenizer import harmony, tokenizer, use_vocab_dir

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
    response_store: str | None = option(None, "where /v1/responses keeps stored responses: a SQLite file, "
                                              "redis://host:port/db (shared by every node), memory or off "
                                              "(default: a SQLite file under ~/.cache/gptoss)")
    response_ttl_s: float = option(30 * 86400.0, "seconds a stored response is kept", gt=0)
    response_store_max: int = option(10_000, "stored responses kept at most (the oldest go first)", ge=1)
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
    """Every option of the served application: the engine's arguments and the server's own."""

    args: EngineArgs = field(default_factory=EngineArgs)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_options(cls, values: dict[str, OptionValue]) -> AppConfig:
        model, engine, cluster, server = split_values(values, *APP_GROUPS)
        return cls(EngineArgs(model, engine, cluster), server)

    def options(self) -> dict[str, OptionValue]:
        return {**self.args.options(), **flat_values(self.server)}

    def engine_args(self) -> EngineArgs:
        return self.args

    @property
    def model(self) -> ModelConfig:
        return self.args.model

    @property
    def engine(self) -> EngineConfig:
        return self.args.engine

    @property
    def cluster(self) -> ClusterConfig:
        return self.args.cluster

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
        return dataclasses.replace(self, args=dataclasses.replace(self.args, model=dataclasses.replace(self.model, model=path)),
                                   server=dataclasses.replace(self.server, served_model_name=self.model_name()))


API_KEY_ENV = "GPTOSS_API_KEY"  # the API key without a command line that `ps` shows (like VLLM_API_KEY)


def prepare(config: AppConfig, say: Callable[[str], None]) -> AppConfig:
    """The one preparation of a server's configuration, by `gptoss serve` before Ray starts (so that
    problems show at once) and by the Serve replica (for a RayService, where it is the first): the
    vocabulary (a server that cannot tokenize must not start), the API key (given, named by
    api_key_env, or GPTOSS_API_KEY), the random model when none is given, `--dtype auto`. Idempotent:
    a prepared configuration comes back unchanged. `say` reports what was chosen for the user."""
    model, server = config.model, config.server
    if model.vocab_dir:
        model = dataclasses.replace(model, vocab_dir=os.path.abspath(model.vocab_dir))
        use_vocab_dir(model.vocab_dir)
    tokenizer(), harmony()
    if server.api_key is None and server.api_key_env:
        value = os.environ.get(server.api_key_env)
        if not value:
            raise ValueError(f"api_key_env names {server.api_key_env}, which is not set in the environment")
        server = dataclasses.replace(server, api_key=value)
    elif server.api_key is None and os.environ.get(API_KEY_ENV):
        server = dataclasses.replace(server, api_key=os.environ[API_KEY_ENV])
    config = AppConfig(dataclasses.replace(config.args, model=model), server)
    if model.model is None:
        config = config.with_random_model(str(default_random_model()))
        say(f"no --model given: serving RANDOM weights (gpt-oss layout, tiny preset) from {config.model.model} "
            f"as '{config.model_name()}'")
    if note := config.args.dtype_note():
        say(note)
    return dataclasses.replace(config, args=config.args.resolved())
