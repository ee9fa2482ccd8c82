"""GET /health (503 while loading or when an engine is dead) and GET /metrics (Prometheus)."""

from __future__ import annotations

from typing import Literal

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


class Unhealthy(BaseModel):
    """Loading, failed, or draining; ``problems`` says why, one line each."""

    model_config = ConfigDict(extra="forbid")
    status: Literal["unavailable", "draining"]
    problems: list[str]


@router.get(
    "/health",
    response_model=None,
    responses={200: {"model": Healthy}, 503: {"model": Unhealthy}, **error_responses(401)},
)
async def health(services: ServicesDep) -> JSONResponse:
    problems = services.problems()
    if problems:
        body = {"status": "unavailable", "problems": problems}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    assert services.family is not None
    return JSONResponse({"status": "ok", "family": services.family.name, "sizes": sorted(services.engines)})


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
async def metrics(services: ServicesDep) -> Response:
    if services.family is not None:
        services.metrics.refresh(services.engines, [s.name for s in services.family.sizes])
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
