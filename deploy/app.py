"""The Ray Serve application: `deploy.app:build_app`, usable as a RayService import_path.

    serveConfigV2:
      applications:
        - name: gptoss
          import_path: deploy.app:build_app
          args: {model: openai/gpt-oss-20b, engine: cluster, expert_shards: 4}

The arguments are validated here (a clear error names every bad one). One ingress replica owns the
engine, and with `engine: cluster` the Ray actors it creates; Serve restarts it (and so them) when
its health check fails.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig
from cluster.launch import EngineArgs, build_engine
from deploy.api import ApiSettings, create_api
from deploy.metrics import RayExport, ServerMetrics
from model_shards.random_checkpoint import default_random_model
from model_shards.tokenizer import harmony, tokenizer, use_vocab_dir

log = logging.getLogger(__name__)

RANDOM_MODEL_NAME = "gptoss-random-tiny"


class AppArgs(BaseModel):
    """Everything build_app accepts (the `args` of a RayService application)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="checkpoint directory or hub id; none: a random tiny model")
    served_model_name: str | None = Field(default=None, min_length=1)
    engine: Literal["local", "cluster"] = "cluster"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    device: str = "cpu"
    expert_weights: Literal["dequantize", "mxfp4"] = "dequantize"
    kv_cache_tokens: int = Field(default=65536, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    max_waiting: int = Field(default=1024, ge=1, description="queued requests beyond which clients get 429")
    attention_replicas: int = Field(default=1, ge=1)
    expert_shards: int = Field(default=1, ge=1)
    expert_split: list[int] | None = None
    gpus_per_attention_replica: float = Field(default=0.0, ge=0.0)
    gpus_per_expert_shard: float = Field(default=0.0, ge=0.0)
    gpus_per_router: float = Field(default=0.0, ge=0.0)
    cpus_per_actor: float = Field(default=1.0, gt=0.0)
    attention_replica_resources: dict[str, float] = Field(default_factory=dict,
                                                          description="custom Ray resources each replica needs")
    expert_shard_resources: dict[str, float] = Field(default_factory=dict)
    router_resources: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ingress_num_cpus: float = Field(default=1.0, ge=0.0, description="CPUs of the Serve replica that runs the engine")
    ingress_resources: dict[str, float] = Field(default_factory=dict,
                                                description="custom Ray resources that place the Serve replica")
    transport: Literal["auto", "shm", "tcp"] = "auto"
    step_timeout_s: float = Field(default=60.0, gt=0.0)
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, description="read the API key from this environment variable "
                                                              "(on Kubernetes: set from a Secret)")
    request_timeout_s: float | None = Field(default=None, gt=0.0)
    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    default_max_tokens: int = Field(default=4096, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    vocab_dir: str | None = Field(default=None, description="directory with o200k_base.tiktoken, when offline")

    def engine_args(self, model: str) -> EngineArgs:
        cluster = ClusterConfig(
            attention_replicas=self.attention_replicas, expert_shards=self.expert_shards,
            expert_bounds=tuple(self.expert_split) if self.expert_split else None,
            gpus_per_attention_replica=self.gpus_per_attention_replica,
            gpus_per_expert_shard=self.gpus_per_expert_shard, gpus_per_router=self.gpus_per_router,
            cpus_per_actor=self.cpus_per_actor, attention_replica_resources=self.attention_replica_resources,
            expert_shard_resources=self.expert_shard_resources, router_resources=self.router_resources,
            placement_strategy=self.placement_strategy, keep_mxfp4=self.expert_weights == "mxfp4",
            transport=self.transport, step_timeout_s=self.step_timeout_s)
        return EngineArgs(model=model, engine=self.engine, dtype=self.dtype, device=self.device,
                          kv_cache_tokens=self.kv_cache_tokens, max_num_seqs=self.max_num_seqs,
                          max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
                          max_waiting=self.max_waiting, cluster=cluster)

    def model_name(self) -> str:
        return self.served_model_name or self.model or RANDOM_MODEL_NAME

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"api_key_env names {self.api_key_env}, which is not set in the environment")
            return value
        return None


def parse_args(args: dict[str, Any]) -> AppArgs:
    try:
        return AppArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid gptoss application arguments: {problems}") from None


@serve.deployment(name="gptoss-openai", num_replicas=1, max_ongoing_requests=100_000, health_check_period_s=10,
                  health_check_timeout_s=30)
@serve.ingress()
class OpenAIServer:
    """The ingress: the engine, the metrics and the FastAPI app in one replica."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = parse_args(args)
        if self.args.vocab_dir:
            use_vocab_dir(self.args.vocab_dir)
        tokenizer(), harmony()  # a server that cannot tokenize must not start
        model = self.args.model
        if model is None:
            model = str(default_random_model())
            log.warning("no model given: serving RANDOM weights (gpt-oss layout, tiny preset) from %s", model)
        self.engine = build_engine(self.args.engine_args(model))
        name = self.args.model_name()
        self.metrics = ServerMetrics(self.engine, name)
        self.export = RayExport(self.metrics.registry)
        key = self.args.key()
        self.asgi_app = create_api(self.engine, ApiSettings(name, key, self.args.max_body_bytes, self.args.request_timeout_s,
                                                       self.args.default_max_tokens), self.metrics)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi_app

    def begin_drain(self) -> int:
        """Refuse new requests (503); returns how many are still in flight (`gptoss serve` polls it)."""
        return self.engine.begin_drain()

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError(self.engine.last_error or "the engine is not healthy")

    def __del__(self) -> None:  # Serve calls it when the replica stops (after its own drain)
        export = getattr(self, "export", None)
        if export is not None:
            export.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(self.args.drain_timeout_s)


def build_app(args: dict[str, Any]) -> Application:
    """RayService import_path target: validated args -> the Serve application."""
    parsed = parse_args(dict(args or {}))
    deployment = OpenAIServer.options(
        graceful_shutdown_timeout_s=parsed.drain_timeout_s + 5, graceful_shutdown_wait_loop_s=1,
        ray_actor_options={"num_cpus": parsed.ingress_num_cpus, "resources": parsed.ingress_resources})
    return deployment.bind(parsed.model_dump(mode="json", exclude={"api_key"}) | (
        {"api_key": parsed.api_key.get_secret_value()} if parsed.api_key else {}))
