"""The router on the tiny family with scripted engines whose load the tests set."""

from __future__ import annotations

import pytest

from boomerang_core.family import Family
from server.config import RoutingConfig, parse_config
from server.engines.base import Engine, SizeLoad
from server.errors import to_api_error
from server.routing import BudgetUnmeetable, Router, RouteRequest, SizeConflict, UnknownModel, UnknownSize
from server.services import load_family, tier_table
from tests.server.deploys import FAMILY, TinyFamilyDirs, deploy_dict
from tests.server.fakes import ScriptedEngine

IDLE = SizeLoad(prefill_tokens_per_s=10_000.0, decode_step_s=0.01)


@pytest.fixture(scope="module")
def family(tiny_dirs: TinyFamilyDirs) -> Family:
    return load_family(parse_config(deploy_dict(tiny_dirs)))


def make_router(
    family: Family, *, shared: bool = True, sizes: tuple[str, ...] = ("k0", "k3", "k4", "k5"), **routing: object
) -> tuple[Router, dict[str, ScriptedEngine], list[tuple[str | None, str]]]:
    if shared:
        one = ScriptedEngine(family, sizes)
        engines = dict.fromkeys(sizes, one)
    else:
        engines = {s: ScriptedEngine(family, (s,)) for s in sizes}
    for name, engine in engines.items():
        engine.loads[name] = IDLE
    decisions: list[tuple[str | None, str]] = []
    tiers = {"small": "k0", **{s: s for s in sizes}}
    router = Router(
        family, tiers, dict[str, Engine](engines), RoutingConfig(**routing),  # type: ignore[arg-type]
        max_batch_size=8, typical_tokens=64, on_decision=lambda s, r: decisions.append((s, r)),
    )  # fmt: skip
    return router, engines, decisions


def ask(size: str | None = None, latency: float | None = None, memory: float | None = None) -> RouteRequest:
    return RouteRequest(size=size, max_latency_ms=latency, max_memory_gb=memory, prompt_tokens=20, max_tokens=16)


def test_names_labels_fractions_and_tiers(family: Family) -> None:
    router, _, decisions = make_router(family)
    cases = {"k3": "k3", "small": "k0", "378K": "k4", "0.8": "k3", "1": "k5", "auto": "k5", "300K": "k0"}
    for text, expected in cases.items():
        assert router.choose(ask(text)).size.name == expected, text
    assert router.choose(ask()).reason == "slo"  # the default size is auto
    fixed, _, _ = make_router(family, default_size="k3")
    d = fixed.choose(ask())
    assert (d.size.name, d.reason) == ("k3", "default")
    assert decisions[0] == ("k3", "named") and decisions[5] == ("k5", "slo")


def test_unknown_dominated_and_unloaded_sizes_are_404(family: Family) -> None:
    router, _, _ = make_router(family)
    for text, words in [("k9", "cannot read"), ("k1", "dominated"), ("huge", "cannot read"), ("1K", "no size")]:
        with pytest.raises(UnknownSize, match=words) as info:
            router.choose(ask(text))
        assert "Served sizes: k0" in str(info.value)
        assert to_api_error(info.value).status == 404
    small, _, _ = make_router(family, sizes=("k0", "k3"))
    with pytest.raises(UnknownSize, match="not loaded"):
        small.choose(ask("k5"))
    assert small.choose(ask("0.9")).size.name == "k3"  # a label or fraction falls to a loaded size below


def test_model_names_and_tags(family: Family) -> None:
    router, _, _ = make_router(family)
    assert router.size_text(FAMILY, None) is None
    assert router.size_text(f"{FAMILY}:96M", None) == "96M"
    assert router.size_text(f"{FAMILY}:k3", "k3") == "k3"
    with pytest.raises(UnknownModel, match=f"serves {FAMILY}, {FAMILY}:k0") as missing:
        router.size_text("gpt-4o", None)
    assert to_api_error(missing.value).status == 404
    with pytest.raises(SizeConflict, match="disagree") as conflict:
        router.size_text(f"{FAMILY}:k3", "k4")
    assert to_api_error(conflict.value).status == 400


def test_memory_budget_is_the_weights_of_the_chosen_size(family: Family) -> None:
    router, _, _ = make_router(family)
    k3, k4 = family.by_name("k3"), family.by_name("k4")
    d = router.choose(ask(memory=(k3.bytes + k4.bytes) / 2e9))
    assert (d.size.name, d.reason) == ("k3", "budget")
    d = router.choose(ask("k5", memory=k4.bytes / 1e9))  # a named size is a ceiling for budgets
    assert (d.size.name, d.reason) == ("k4", "budget")


def test_latency_budget_moves_to_a_less_loaded_size(family: Family) -> None:
    router, engines, _ = make_router(family, shared=False)
    idle = router.choose(ask(latency=1_000))
    assert (idle.size.name, idle.reason) == ("k5", "budget")
    engines["k5"].loads["k5"] = SizeLoad(running=8, waiting=8, prefill_tokens_per_s=10_000.0, decode_step_s=0.05)
    busy = router.predict(family.by_name("k5"), 20, 16)
    assert busy.queue_ms > 1_000 and busy.load.waiting == 8
    loaded = router.choose(ask(latency=1_000))
    assert (loaded.size.name, loaded.reason) == ("k4", "budget")
    assert loaded.prediction.latency_ms <= 1_000


def test_a_shared_engine_queues_every_size_behind_its_batch(family: Family) -> None:
    router, engines, _ = make_router(family)
    engine = engines["k0"]  # one step time for the whole engine; k0 holds the batch
    for name in engine.sizes:
        engine.loads[name] = SizeLoad(prefill_tokens_per_s=10_000.0, decode_step_s=0.05)
    engine.loads["k0"] = SizeLoad(running=8, waiting=4, prefill_tokens_per_s=10_000.0, decode_step_s=0.05)
    p = router.predict(family.by_name("k5"), 20, 16)
    assert p.load.running == 8 and p.load.waiting == 4 and p.queue_ms > 0
    grow_small = router.predict(family.by_name("k0"), 20, 16).decode_ms
    assert p.decode_ms > grow_small > 16 * 50  # a larger size adds more work to each shared step


def test_no_size_fits_degrades_or_refuses_saying_why(family: Family) -> None:
    router, _, decisions = make_router(family)
    d = router.choose(ask(latency=0.001))
    assert (d.size.name, d.reason) == ("k0", "degraded")
    strict, _, decisions = make_router(family, allow_degrade=False)
    with pytest.raises(BudgetUnmeetable) as info:
        strict.choose(ask(latency=0.001, memory=10))
    message, error = str(info.value), to_api_error(info.value)
    assert "max_latency_ms=0.001" in message and "k0" in message and "predicted" in message
    assert "allow_degrade" in message and error.headers["Retry-After"] and error.status == 429
    assert decisions[-1] == (None, "rejected")


def test_auto_misses_the_slo_by_degrading_never_by_refusing(family: Family) -> None:
    router, _, _ = make_router(family, slo_ms=1, allow_degrade=False)
    d = router.choose(ask("auto"))
    assert (d.size.name, d.reason) == ("k0", "degraded")


def test_dominated_sizes_are_never_chosen_by_budget_or_slo(family: Family) -> None:
    sizes = ("k0", "k1", "k2", "k3")
    router, _, _ = make_router(family, sizes=sizes)
    k0 = family.by_name("k0")
    for latency in (None, 1e6, 0.001):
        assert router.choose(ask(latency=latency, memory=k0.bytes / 1e9)).size.name == "k0"
    assert router.choose(ask("k2")).size.name == "k2"  # named by the client, and loaded by the config


def test_tier_table_defaults_to_every_servable_size(family: Family, tiny_dirs: TinyFamilyDirs) -> None:
    assert tier_table(family, parse_config(deploy_dict(tiny_dirs, tiers=[]))) == {
        "k0": "k0", "k3": "k3", "k4": "k4", "k5": "k5"
    }  # fmt: skip
    assert tier_table(family, parse_config(deploy_dict(tiny_dirs)))["large"] == "k5"


def test_sizes_building_or_removed_go_to_the_nearest_size_or_404(family: Family) -> None:
    absent = {"l6": (6, "the family is still building (distill)"), "k9": (7, "a reload at noon removed it")}
    router, _, _ = make_router(family)
    router.absent = lambda: absent
    layers = {s.name: s.num_layers for s in family.sizes}
    d = router.choose(ask("l6"))
    assert d.reason == "nearest" and d.size.name == min(
        ("k0", "k3", "k4", "k5"), key=lambda n: (abs(layers[n] - 6), layers[n])
    )
    assert router.choose(ask("K9")).reason == "nearest"  # names ignore case
    strict, _, _ = make_router(family, missing_size="error")
    strict.absent = lambda: absent
    with pytest.raises(UnknownSize, match="still building") as info:
        strict.choose(ask("l6"))
    assert to_api_error(info.value).status == 404 and "Served sizes" in str(info.value)
    with pytest.raises(UnknownSize, match="cannot read"):
        router.choose(ask("l2"))  # neither in the family nor absent: as before
