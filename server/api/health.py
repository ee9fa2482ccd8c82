"""GET /health (503 while loading or when an engine is dead) and GET /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from server.errors import error_responses
from server.services import ServicesDep

router = APIRouter()


class Healthy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok"]
    family: str
    sizes: list[str]
    generation: int  # 0 for the family the process started with, one more per live reload
    build: dict[str, Any] | None = None  # the family's background build: stage, progress, eta_s, pending_sizes
    last_reload: dict[str, Any] | None = None


class Unhealthy(BaseModel):
    """Loading, failed, or draining; ``problems`` says why, one line each."""

    model_config = ConfigDict(extra="forbid")
    status: Literal["unavailable", "draining"]
    problems: list[str]
    build: dict[str, Any] | None = None


@router.get(
    "/health",
    response_model=None,
    responses={200: {"model": Healthy}, 503: {"model": Unhealthy}, **error_responses(401)},
)
async def health(services: ServicesDep) -> JSONResponse:
    problems = services.problems()
    build = services.build.public() if services.build is not None else None
    if problems or services.live is None:
        down = {"status": "unavailable", "problems": problems, "build": build}
        return JSONResponse(down, status_code=503, headers={"Retry-After": "5"})
    live = services.live
    body: dict[str, Any] = {
        "status": "ok", "family": live.family.name, "sizes": sorted(live.engines), "generation": live.generation,
        "build": build, "last_reload": services.last_reload,
    }  # fmt: skip
    return JSONResponse(body)


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
async def metrics(services: ServicesDep) -> Response:
    live = services.live
    if live is not None:
        services.metrics.refresh(live.engines, [s.name for s in live.family.sizes])
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
