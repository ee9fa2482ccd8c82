"""GET /v1/models: the family and every size, with parameters, layers, loaded and dominated."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from boomerang_core.family import FamilySize
from server.errors import NotFound, error_responses
from server.services import Services, ServicesDep

router = APIRouter()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "boomerang"
    size: str | None = None  # None for the family entry
    label: str | None = None
    params: int
    num_layers: int
    weight_bytes: int
    patched_blocks: list[int] = []
    loaded: bool
    dominated: bool = False
    perplexity: float | None = None
    tiers: list[str] = []
    # building: the family's background build makes it; interim: the teacher with layers dropped, served
    # at that size until the build replaces it
    status: Literal["ready", "interim", "building"] = "ready"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    build: dict[str, Any] | None = None  # the family's background build: stage, progress, eta_s, pending_sizes


def model_cards(services: Services) -> list[ModelCard]:
    live = services.ready()
    family, router_ = live.family, live.router
    loaded = {s.name for s in router_.loaded()}
    tiers: dict[str, list[str]] = {}
    for tier, size in router_.tiers.items():
        if tier != size:
            tiers.setdefault(size, []).append(tier)
    largest = family.largest
    interim = set(family.info.get("interim", []))

    def card(s: FamilySize) -> ModelCard:
        return ModelCard(
            id=live.served_name(s), size=s.name, label=s.label, params=s.params, num_layers=s.num_layers,
            weight_bytes=s.bytes, patched_blocks=list(s.plan.patched), loaded=s.name in loaded,
            dominated=s.dominated, perplexity=s.perplexity, tiers=sorted(tiers.get(s.name, [])),
            status="interim" if s.name in interim else "ready",
        )  # fmt: skip

    family_card = ModelCard(
        id=family.name, params=largest.params, num_layers=largest.num_layers,
        weight_bytes=family.store.resident_bytes(), loaded=bool(loaded),
    )  # fmt: skip
    building = [
        ModelCard(id=f"{family.name}:{name}", size=name, params=0, num_layers=int(name[1:]), weight_bytes=0,
                  loaded=False, status="building")
        for name, (_, why) in services.absent_sizes().items() if why.startswith("the family is still building")
    ]  # fmt: skip
    return [family_card, *(card(s) for s in family.sizes), *building]


@router.get("/v1/models", responses=error_responses(401, 503))
async def list_models(services: ServicesDep) -> ModelList:
    build = services.build.public() if services.build is not None else None
    return ModelList(data=model_cards(services), build=build)


@router.get("/v1/models/{model:path}", responses=error_responses(401, 404, 503))
async def retrieve_model(model: str, services: ServicesDep) -> ModelCard:
    for card in model_cards(services):
        if card.id.lower() == model.lower():
            return card
    raise NotFound(f"the model '{model}' does not exist; GET /v1/models lists them", param="model")
