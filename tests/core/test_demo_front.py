"""The demo serves the searched Pareto front: built by the same code path as the first run, on a
tiny teacher/student pair written like the demo cache, and never worse than any plan it was
seeded with or than ShortGPT at the same layer count."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from boomerang_core import build, demo, synth
from boomerang_core.distill import CHECKPOINTS
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.plan import teacher_plan
from boomerang_core.quality.baselines import shortgpt_plan
from boomerang_core.quality.chat import chat_scores, chat_set
from boomerang_core.quality.scoring import score_plans, teacher_pass
from boomerang_core.quality.search import edge_costs
from boomerang_core.store import LayerStore
from tests.tiny import write_pair

LAYERS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A demo cache (teacher/ and student/) holding a tiny pair instead of SmolLM2, with the teacher's
    calibration conversations already there (a random tiny model writes none worth keeping)."""
    root = tmp_path_factory.mktemp("cache")
    teacher, _ = write_pair(root / demo.DEMO_NAME, layers=LAYERS)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a + 1}?"},
                          {"role": "assistant", "content": f"{a} plus {a + 1} is {2 * a + 1}."}], "finished": True}
            for a in range(build.SEARCH_CONVERSATIONS)]  # fmt: skip
    folder = synth.cache_dir_for(teacher, synth.SynthSettings(), root)
    synth.SplitCache(folder / "calib.jsonl").append(rows, {"generated": len(rows), "kept": len(rows)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOMERANG_CACHE", str(root))  # where the build looks for the conversations
        yield root


@pytest.fixture(scope="module")
def family(cache: Path) -> Family:
    torch.set_num_threads(1)
    student = demo.ensure_demo(cache, progress=False)  # the teacher and student exist: only the search runs
    return Family.load(student, LayerStore.load(student.parent / "teacher", student))


def test_served_sizes_are_the_front_one_per_layer_count(family: Family) -> None:
    assert family.order == "search"
    assert family.info["demo_family_version"] == demo.DEMO_FAMILY_VERSION
    spec = family.store.spec
    assert spec is not None
    counts = [s.num_layers for s in family.sizes if s.name.startswith("l")]
    assert counts == list(range(spec.num_student_layers, LAYERS + 1))
    # the largest size is the teacher; a searched plan with as many layers that beat it is m<layers>
    assert family.largest.name == f"l{LAYERS}" and family.largest.plan.key == teacher_plan(LAYERS).key
    assert [s.name for s in family.sizes if not s.name.startswith("l")] in ([], [f"m{LAYERS}"])
    assert family.info["metric"] == demo.DEMO_METRIC == "chat_kl"  # chosen by what a chat user gets
    kls = [s.plan.meta["calib_chat_kl"] for s in family.sizes]
    for size, kl in zip(family.sizes, kls, strict=True):  # served sizes get strictly better
        smaller = [k for s, k in zip(family.sizes, kls, strict=True) if s.num_layers < size.num_layers]
        is_teacher = size.plan.key == teacher_plan(LAYERS).key
        assert size.dominated == (not is_teacher and any(k <= kl for k in smaller)), size.name
    served = [s for s in family.sizes if not s.dominated]
    assert served[0].num_layers == spec.num_student_layers  # nothing is smaller, so it is never dominated
    assert {s.name for s in family.servable} == {s.name for s in served}


def test_front_is_never_worse_than_its_seeds_or_shortgpt(cache: Path, family: Family) -> None:
    """Independently scored: at each layer count, the front's chat KL on the teacher's calibration
    conversations is at most that of every seed plan (KL, last and first orders, one-block patchings)
    and of ShortGPT with that many layers."""
    store = family.store
    assert store.spec is not None and store.tokenizer is not None
    calib = demo.calibration_blocks(store)
    teacher = teacher_pass(store, calib)
    shortgpt = [shortgpt_plan(edge_costs(store, teacher).skip, c) for c in range(store.spec.num_student_layers, LAYERS)]
    rivals = [*demo.search_seeds(store.spec, family.info["patch_order"]), *shortgpt]
    rivals = list({p.key: p for p in rivals}.values())
    assert family.info["search"]["plans_scored"] >= len(rivals)  # the seeds were scored, not only the DP's picks
    front = [s.plan for s in family.sizes]
    conversations = synth.teacher_conversations(cache / demo.DEMO_NAME / "teacher", build.SEARCH_CONVERSATIONS,
                                                split="calib", progress=False)  # fmt: skip
    chat = chat_scores(store, [*front, *rivals], chat_set(store.tokenizer, conversations), progress=False)
    best: dict[int, float] = {}
    for p, c in zip(front, chat, strict=False):
        best[p.num_layers] = min(c.kl, best.get(p.num_layers, c.kl))
    for plan, c in zip(rivals, chat[len(front) :], strict=True):
        assert best[plan.num_layers] <= c.kl + 1e-6, (plan.describe(), plan.origin)
    scores = score_plans(store, front, teacher=teacher)
    for size, score, c in zip(family.sizes, scores, chat, strict=False):  # the saved scores are the measured ones
        assert size.plan.meta["calib_chat_kl"] == pytest.approx(c.kl, rel=1e-4, abs=1e-6)
        assert size.plan.meta["calib_nll"] == pytest.approx(score.nll, rel=1e-4, abs=1e-6)
        assert size.plan.meta["calib_kl"] == pytest.approx(score.kl, rel=1e-4, abs=1e-6)


def test_stale_family_is_searched_again(cache: Path, family: Family) -> None:
    """A family.json from before the front (no version) is replaced on the next start; a current one
    is reused as is."""
    student = cache / demo.DEMO_NAME / "student"
    saved = (student / FAMILY_FILE).read_text()
    leftover = student / CHECKPOINTS / "checkpoint-70"  # the resume state of a finished distillation
    leftover.mkdir(parents=True)
    (leftover / "optimizer.pt").write_bytes(b"0" * 1024)
    assert demo.ensure_demo(cache, progress=False) == student
    assert (student / FAMILY_FILE).read_text() == saved  # current: not searched again
    assert not (student / CHECKPOINTS).exists()  # ... and the finished run's checkpoints are gone
    old = Family.from_store(demo.DEMO_NAME, family.store, order="last")
    old.save(student)
    assert json.loads((student / FAMILY_FILE).read_text())["order"] == "last"
    demo.ensure_demo(cache, progress=False)
    assert json.loads((student / FAMILY_FILE).read_text())["order"] == "search"
