"""GET /health (503 while loading or when an engine is dead) and GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.gateway import GatewayDep

router = APIRouter()


@router.get("/health")
async def health(gateway: GatewayDep) -> JSONResponse:
    problems = gateway.problems()
    if problems:
        body = {"status": "unavailable", "problems": problems}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    assert gateway.family is not None
    return JSONResponse({"status": "ok", "family": gateway.family.name, "sizes": sorted(gateway.engines)})


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    if gateway.family is not None:
        gateway.metrics.refresh(gateway.engines, [s.name for s in gateway.family.sizes])
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)
