"""GET /health, /metrics and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from deploy.server.errors import RETRY_AFTER_S, APIError
from deploy.server.protocol import ERROR_RESPONSES, ModelCard, ModelList
from deploy.server.service import ApiService, get_service

router = APIRouter()


@router.get("/health", responses={503: ERROR_RESPONSES[503]})
def health(service: ApiService = Depends(get_service)) -> JSONResponse:
    engine = service.engine
    if not engine.healthy:
        raise APIError(503, engine.last_error or "the engine is not healthy", "server_error", None,
                       "engine_unavailable", {"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response)
def metrics(service: ApiService = Depends(get_service)) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
def models(service: ApiService = Depends(get_service)) -> ModelList:
    return ModelList(data=[ModelCard(id=service.settings.model_name, created=service.created)])
