"""POST /admin/reload: re-read the deploy file and the family, load them beside the family serving now,
check them, and swap live (what SIGHUP does too). Needs the API key; a server without one refuses it
(403): reloading is for operators, and SIGHUP is there for a server without a key."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from server.errors import Forbidden, error_responses
from server.services import ServicesDep

router = APIRouter()


class Reloaded(BaseModel):
    status: str = "reloaded"
    family: str
    sizes: list[str]
    generation: int


@router.post("/admin/reload", responses=error_responses(401, 403, 409, 503))
async def reload(services: ServicesDep) -> Reloaded:
    if services.config.auth.resolved_key() is None:
        raise Forbidden("the admin endpoints need an API key (auth.api_key); without one, send SIGHUP to reload")
    services.ready()  # a server that is not serving yet has nothing to swap
    live = await services.reload("POST /admin/reload")
    return Reloaded(family=live.family.name, sizes=sorted(live.engines), generation=live.generation)
