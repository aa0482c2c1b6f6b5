"""The OpenAI-compatible HTTP API as a FastAPI app, over any engine (local or cluster).

`create_api(engine, settings)` builds the app; the Serve deployment (app.py) calls it with its
engine, and tests call it directly. The routes are APIRouters (routes/) over one ApiService
(service.py); every error goes through errors.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cluster.engine.engine import Engine
from deploy.server import errors
from deploy.server.metrics import ServerMetrics
from deploy.server.middleware import install_middleware
from deploy.server.routes import admin, chat, completions, responses, system
from deploy.server.service import ApiService, ApiSettings

__all__ = ["ApiSettings", "create_api"]


def create_api(engine: Engine, settings: ApiSettings, metrics: ServerMetrics | None = None) -> FastAPI:
    # /docs and /redoc are off unless asked for: their pages load scripts from a CDN.
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="gptoss-ray", version="0.1.0",
                  description="OpenAI-compatible API for gpt-oss on a Ray cluster", **docs)
    app.state.service = ApiService(engine, settings, metrics or ServerMetrics(engine, settings.model_name))
    errors.install(app)
    install_middleware(app, settings.api_key, settings.max_body_bytes)
    for module in (system, chat, completions, responses, admin):
        app.include_router(module.router)
    _document_model_name(app, settings.model_name)
    return app


def _document_model_name(app: FastAPI, name: str) -> None:
    """The schema names the one model this server serves (other names get 404, as OpenAI's do)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for component in schema.get("components", {}).get("schemas", {}).values():
                model = component.get("properties", {}).get("model")
                if model is not None and "Request" in component.get("title", ""):
                    model["enum"] = [name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
