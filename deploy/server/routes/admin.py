"""POST /admin/scale and GET /admin/topology: resize the serving plane by hand, and list its actors
(docs/scaling.md). Behind the API key, as /v1 is."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deploy.server.errors import APIError
from deploy.server.protocol import ERROR_RESPONSES
from deploy.server.service import ApiService, get_service

router = APIRouter()


class ScaleRequest(BaseModel):
    """Either count may be left out (it stays as it is)."""

    model_config = ConfigDict(extra="forbid")
    attention_replicas: int | None = Field(None, ge=1)
    expert_shards: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0, description="give up after this (default: --resize-timeout)")


@router.post("/admin/scale", responses={code: ERROR_RESPONSES[code] for code in (400, 401, 503)})
async def scale(body: ScaleRequest, service: ApiService = Depends(get_service)) -> JSONResponse:
    """Answered once the new plane serves; a resize that fails (its resources never came, an actor
    could not load) answers 503 and the old plane serves on."""
    done = service.engine.scale(body.attention_replicas, body.expert_shards, "manual", body.timeout_s)
    outcome = await asyncio.wrap_future(done)  # ResizeRefused (counts that cannot work) maps to 400
    if not outcome.ok:
        raise APIError(503, f"the resize failed: {outcome.error}", "server_error", None, "resize_failed")
    return JSONResponse({"attention_replicas": outcome.replicas[1], "expert_shards": outcome.shards[1],
                         "previous": {"attention_replicas": outcome.replicas[0], "expert_shards": outcome.shards[0]},
                         "seconds": round(outcome.seconds, 3)})


@router.get("/admin/topology", responses={401: ERROR_RESPONSES[401]})
def topology(service: ApiService = Depends(get_service)) -> JSONResponse:
    """The serving plane's actors, as `gptoss generate --json` lists them."""
    replicas, shards = service.engine.counts()
    actors = [dataclasses.asdict(a) for a in service.engine.executor.topology()]
    return JSONResponse({"attention_replicas": replicas, "expert_shards": shards, "actors": actors})
