"""The Ray Serve application: `deploy.app:build_app`, usable as a RayService import_path.

    serveConfigV2:
      applications:
        - name: gptoss
          import_path: deploy.app:build_app
          args: {model: openai/gpt-oss-20b, engine: cluster, expert_shards: 4}

The args are the options of the configuration schema (cluster/config.py, deploy/config.py) under
the same names and defaults as `gptoss serve`'s flags; `AppArgs` is generated from that schema and
validates them (a clear error names every bad one). One ingress replica owns the engine, and with
`engine: cluster` the Ray actors it creates; Serve restarts it (and so them) when its health check
fails.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model
from ray import serve
from ray.serve import Application

from cluster.launch import build_engine
from cluster.options import OptionSpec, schema
from deploy.server.api import ApiSettings, create_api
from deploy.config import APP_GROUPS, AppConfig, prepare
from deploy.server.metrics import RayExport, ServerMetrics
from deploy.server.store import default_store_path

log = logging.getLogger(__name__)


class _AppArgsBase(BaseModel):
    # strict: "10" is not 10 and true is not 1; unknown names are errors, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)

    def config(self) -> AppConfig:
        values = {}
        for o in schema(*APP_GROUPS):
            value = getattr(self, o.name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = tuple(value)
            values[o.name] = value
        return AppConfig.from_options(values)


def _field(o: OptionSpec) -> tuple[Any, Any]:
    """(pydantic annotation, Field) of one option. YAML and JSON have lists, not tuples."""
    annotation = o.type
    if o.base == tuple[int, ...]:
        annotation = list[int] | None if o.optional else list[int]
    if o.secret:
        annotation = SecretStr | None
    default: dict[str, Any] = {"default_factory": dict} if isinstance(o.default, dict) else {"default": o.default}
    bounds = {k: v for k, v in (("ge", o.ge), ("gt", o.gt), ("le", o.le)) if v is not None}
    return annotation, Field(**default, **bounds, description=o.help)


AppArgs = create_model("AppArgs", __base__=_AppArgsBase, __doc__="Everything build_app accepts (a RayService "
                       "application's `args`), generated from the configuration schema.",
                       **{o.name: _field(o) for o in schema(*APP_GROUPS)})  # type: ignore[call-overload]


def parse_args(args: dict[str, Any]) -> _AppArgsBase:
    """Validated application args (`.config()` gives the configuration); ValueError naming every bad one."""
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

    def __init__(self, config: AppConfig) -> None:
        # A RayService's replica prepares here first; after `gptoss serve` this changes nothing.
        self.config = config = prepare(config, log.warning)
        self.engine = build_engine(config.engine_args())
        name = config.model_name()
        self.metrics = ServerMetrics(self.engine, name)
        self.export = RayExport(self.metrics.registry)
        s = config.server
        settings = ApiSettings(name, s.api_key, s.max_body_bytes, s.request_timeout_s, s.default_max_tokens, s.docs,
                               s.response_store or default_store_path(), s.response_ttl_s, s.response_store_max)
        self.asgi_app = create_api(self.engine, settings, self.metrics)

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
            engine.shutdown(self.config.server.drain_timeout_s)


def build_app(args: dict[str, Any]) -> Application:
    """RayService import_path target: validated args -> the Serve application."""
    return application(parse_args(dict(args or {})).config())


def application(config: AppConfig) -> Application:
    """The Serve application of a configuration (`gptoss serve` passes its own, validated once)."""
    s = config.server
    deployment = OpenAIServer.options(
        graceful_shutdown_timeout_s=s.drain_timeout_s + 5, graceful_shutdown_wait_loop_s=1,
        ray_actor_options={"num_cpus": s.ingress_num_cpus, "resources": s.ingress_resources})
    return deployment.bind(config)
