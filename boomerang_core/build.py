"""Build a family: distil the student, order its patches, search the served sizes, save ``family.json``,
reporting every stage to a JSON status file that a server (or anyone) can read while it runs.

A server serves the teacher while this runs in a child process at a lower CPU priority
(``python -m boomerang_core.build``), then loads the finished family live. Every stage is
resumable: the distillation continues from its last checkpoint, and a student that is already
distilled is only searched. The status file is replaced atomically at each update::

    {"stage": "distill", "stages": ["teacher", "distill", "order", "search"], "stage_progress": 0.42,
     "progress": 0.31, "eta_s": 1130.0, "elapsed_s": 512.3, "pending_sizes": ["l18", ..., "l29"],
     "message": "...", "pid": 1234, "updated_at": 1796200000.0}

``stage`` ends as ``done`` (``family_dir`` holds the family) or ``failed`` (``error`` says why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from boomerang_core.alignment import STUDENT_CONFIG_FILE, StudentSpec
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.distill import CHECKPOINTS, RECIPE_FILE, DistillConfig, distill
from boomerang_core.family import FAMILY_FILE, Family, dominated_flags
from boomerang_core.loading import load_config
from boomerang_core.plan import SizePlan, enumerate_plans, patch_order, plan_for_patched
from boomerang_core.store import LayerStore

STAGES = ("teacher", "interim", "synth", "distill", "order", "search")
# Each stage's share of a build's time, from the demo's first start on a quiet 2-core CPU (minutes:
# GGUF conversion 0.5, interim sizes 0.2, 501 teacher conversations 13.5, distillation of 200K tokens
# 9.6, KLPatch order 2.4, search by chat KL 4.9; 31 in all). The ETA scales them by how fast this
# build's own finished stages ran against these figures.
STAGE_MINUTES = {"teacher": 0.5, "interim": 0.2, "synth": 13.5, "distill": 9.6, "order": 2.4, "search": 4.9}
CALIB_BLOCKS = 4  # 4 x 256 calibration tokens for the KLPatch order
SEARCH_CALIB_BLOCKS = 8  # 8 x 256 for the search's KL ranking (the same text, plus as much again)
SEARCH_K_BEST = 2  # DP proposals scored per layer count (k=2 found the same front as k=3 on the demo)
# Calibration conversations of the teacher (their own split, apart from training and evaluation) that
# the chat_kl metric ranks plans on: about 2,000 response tokens, as many as the perplexity ranking has
SEARCH_CONVERSATIONS = 8


class BuildStatus:
    """Writes the status file (``path`` None: keeps it in memory only). ``stages``: the stages this
    build will run, in order; the ETA counts only those."""

    def __init__(self, path: str | Path | None, stages: Sequence[str] = STAGES, pending_sizes: Sequence[str] = ()):
        self.path = Path(path) if path is not None else None
        self.stages = [s for s in STAGES if s in stages]
        self.pending_sizes = list(pending_sizes)
        self.started = time.monotonic()
        self.stage_name = self.stages[0] if self.stages else "done"
        self.stage_started = self.started
        self.stage_progress = 0.0
        self.done_seconds: dict[str, float] = {}  # finished stage -> seconds it took
        self.state: dict[str, Any] = {}
        self.sticky: dict[str, Any] = {}  # kept in every later write (where the interim sizes are)
        self._write()

    def stage(self, name: str, message: str = "") -> None:
        """Begin ``name`` (the previous stage is finished)."""
        now = time.monotonic()
        if self.stage_name in self.stages and self.stage_name != name:
            self.done_seconds[self.stage_name] = now - self.stage_started
        self.stage_name, self.stage_started, self.stage_progress = name, now, 0.0
        self._write(message=message or f"{name} started")

    def progress(self, fraction: float, message: str = "") -> None:
        self.stage_progress = min(max(fraction, 0.0), 1.0)
        self._write(message=message)

    def done(self, family_dir: Path) -> None:
        self.stage("done", "the family is ready")
        self._write(stage="done", family_dir=str(family_dir), eta_s=0.0, progress=1.0)

    def failed(self, error: str) -> None:
        self._write(stage="failed", error=error, eta_s=None)

    def eta_s(self) -> float | None:
        """Seconds left: the current stage from its own rate once it is 2% in, the later stages from
        the demo's stage times scaled by how this build's finished work compared with them."""
        if self.stage_name not in self.stages:
            return None
        now = time.monotonic()
        in_stage = now - self.stage_started
        minutes, progress = STAGE_MINUTES, self.stage_progress
        started = progress >= 0.02  # before that, time in the stage has no progress to set against it
        spent = sum(self.done_seconds.values()) + (in_stage if started else 0.0)
        expected = sum(minutes[s] for s in self.done_seconds)
        expected += minutes[self.stage_name] * progress if started else 0.0
        scale = spent / (60 * expected) if expected > 0 and spent > 5 else 1.0
        if started:
            current = in_stage * (1 - progress) / progress
        else:
            current = max(minutes[self.stage_name] * 60 * scale - in_stage, 0.0)
        later = self.stages[self.stages.index(self.stage_name) + 1 :]
        return current + sum(minutes[s] for s in later) * 60 * scale

    def overall(self) -> float:
        total = sum(STAGE_MINUTES[s] for s in self.stages) or 1.0
        finished = sum(STAGE_MINUTES[s] for s in self.done_seconds if s in self.stages)
        current = STAGE_MINUTES.get(self.stage_name, 0.0) * self.stage_progress if self.stage_name in self.stages else 0
        return min((finished + current) / total, 1.0)

    def _write(self, **extra: Any) -> None:
        eta = self.eta_s()
        self.state = {
            "stage": self.stage_name,
            "stages": self.stages,
            "stage_progress": round(self.stage_progress, 4),
            "progress": round(self.overall(), 4),
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "stage_seconds": {k: round(v, 1) for k, v in self.done_seconds.items()},  # finished stages
            "pending_sizes": self.pending_sizes,
            "message": "",
            "pid": os.getpid(),
            "updated_at": time.time(),
        }
        self.state.update(self.sticky)
        self.state.update(extra)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The status a build last wrote, or None (no file yet, or a file being replaced)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _StepProgress(TrainerCallback):
    """Reports the distillation's optimizer steps to the status file (at most once a second)."""

    def __init__(self, status: BuildStatus) -> None:
        self.status = status
        self.last = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if state.max_steps and (now - self.last >= 1.0 or state.global_step >= state.max_steps):
            self.last = now
            self.status.progress(state.global_step / state.max_steps, f"step {state.global_step}/{state.max_steps}")


# --- what a build does ----------------------------------------------------------------------------


def finished_student(student: str | Path) -> bool:
    student = Path(student)
    return (student / "model.safetensors").is_file() and (student / STUDENT_CONFIG_FILE).is_file()


def build_stages(recipe: DistillConfig, metric: str = "ppl", interim: bool = False) -> tuple[str, ...]:
    """The stages a build of ``recipe`` runs after the teacher is there: ``synth`` when it trains on or
    searches by the teacher's own conversations."""
    chat = recipe.chat_fraction > 0 or metric == "chat_kl"
    return tuple(s for s in STAGES[1:] if (s != "interim" or interim) and (s != "synth" or chat))


def synthesise(
    teacher: str | Path,
    recipe: DistillConfig,
    metric: str = "ppl",
    *,
    train: bool = True,
    progress: bool = True,
    status: BuildStatus | None = None,
) -> None:
    """Generate (or find cached) the teacher's conversations that the build needs: the calibration
    ones the ``chat_kl`` search ranks on, and (``train``) the ``chat_fraction`` of the training tokens.
    ``status`` gets the training conversations' progress (the calibration ones are a few)."""
    from boomerang_core.data import chat_stream
    from boomerang_core.distill import chat_blocks
    from boomerang_core.loading import load_tokenizer
    from boomerang_core.synth import teacher_conversations

    def report(held: int, asked: int) -> None:
        if status is not None and asked:
            status.progress(held / asked, f"{held}/{asked} teacher conversations")

    if metric == "chat_kl":
        teacher_conversations(teacher, SEARCH_CONVERSATIONS, split="calib", progress=progress)
    if train and recipe.chat_fraction > 0:
        tokens = chat_blocks(recipe) * recipe.seq_len
        chat_stream(teacher, load_tokenizer(teacher), tokens, progress=progress, on_progress=report)


def pending_size_names(teacher: str | Path, recipe: DistillConfig) -> list[str]:
    """The sizes a build will search, by name: one per layer count from the student's to the teacher's
    (``l<layers>``; the teacher's own size is served already)."""
    layers = load_config(teacher).num_hidden_layers
    spec = recipe.spec(layers)
    return [f"l{n}" for n in range(spec.num_student_layers, layers)]


def build_family(
    teacher: str | Path,
    student: str | Path,
    recipe: DistillConfig,
    *,
    name: str,
    status: BuildStatus | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    metric: str = "ppl",
) -> Family:
    """Distil ``student`` from ``teacher`` by ``recipe`` (resuming an interrupted run; skipped when the
    student is finished), search its served sizes by ``metric`` (``ppl`` or ``chat_kl``) and save them
    to ``student/family.json``. The teacher's conversations the recipe or the metric needs are
    generated first (stage ``synth``; cached, so a rerun finds them)."""
    from boomerang_core.quality.search import select_for_metric

    select_for_metric(metric)  # an unknown metric fails before hours of work, not after
    status = status or BuildStatus(None, build_stages(recipe, metric))
    student = Path(student)
    if "synth" in status.stages:
        status.stage("synth", "the teacher writes its own conversations to distil and search on")
        synthesise(teacher, recipe, metric, train=not finished_student(student), progress=progress, status=status)
    if not finished_student(student):
        status.stage("distill", f"distilling {student.name} from {Path(teacher).name}")
        distill(teacher, student, recipe, progress=progress, callbacks=[_StepProgress(status)])
        if not finished_student(student):
            raise RuntimeError(f"the distillation of {student} stopped before its token budget")
    shutil.rmtree(student / CHECKPOINTS, ignore_errors=True)  # a finished run's resume state (~1.7 GB for the demo)
    store = LayerStore.load(teacher, student)
    family = searched_family(store, name, status=status, progress=progress, metric=metric, teacher=teacher)
    recorded = student / RECIPE_FILE  # the recipe this student was really distilled with
    family.info["recipe"] = json.loads(recorded.read_text()) if recorded.is_file() else recipe.to_dict()
    family.info.update(info or {})
    family.save(student)
    return family


def searched_family(
    store: LayerStore,
    name: str,
    *,
    status: BuildStatus | None = None,
    progress: bool = True,
    metric: str = "ppl",
    teacher: str | Path | None = None,
) -> Family:
    """The family over ``store``: the Pareto front of every plan the resident layers express
    (:mod:`boomerang_core.quality.search`), seeded with the KLPatch order, the ``last`` and ``first``
    orders and every one-block patching, all scored on the calibration split. The lowest ``metric``
    wins at each layer count: ``ppl`` (calibration perplexity) or ``chat_kl`` (KL to the teacher per
    response token on ``SEARCH_CONVERSATIONS`` of the ``teacher``'s calibration conversations). One
    size per layer count, named ``l<layers>``; a size no better than a smaller one is marked
    dominated and never routed to."""
    from boomerang_core.quality.klpatch import klpatch_order
    from boomerang_core.quality.search import family_from_search, search, select_for_metric

    assert store.tokenizer is not None and store.spec is not None
    select = select_for_metric(metric)
    chat = None
    if select == "chat_kl":
        from boomerang_core.quality.chat import chat_set
        from boomerang_core.synth import teacher_conversations

        if teacher is None:
            raise ValueError("metric chat_kl needs the teacher (its calibration conversations)")
        conversations = teacher_conversations(teacher, SEARCH_CONVERSATIONS, split="calib", progress=progress)
        chat = chat_set(store.tokenizer, conversations)
    calib_ids = calibration_blocks(store)
    if status is not None:
        status.stage("order", "ordering the student's blocks by KL (KLPatch)")
    kl_order = klpatch_order(store, calib_ids[:CALIB_BLOCKS], progress=progress)
    if status is not None:
        status.stage("search", "searching the best plan at every layer count")
    seeds = search_seeds(store.spec, kl_order)
    result = search(store, calib_ids, k_best=SEARCH_K_BEST, seeds=seeds, select=select, chat=chat, progress=progress)
    tokens = {"calib": int(calib_ids.numel()), "heldout": 0}
    family = family_from_search(name, store, result, k_best=SEARCH_K_BEST, tokens=tokens)
    family.info["patch_order"] = list(kl_order)
    return family


def calibration_blocks(store: LayerStore, blocks: int = SEARCH_CALIB_BLOCKS) -> torch.Tensor:
    """The calibration split's first ``blocks`` x 256 tokens (disjoint from the held-out text)."""
    assert store.tokenizer is not None
    _, _, calib = corpus_texts(DistillConfig().corpus)
    return token_blocks(store.tokenizer, calib, 256, max_blocks=blocks)


def search_seeds(spec: StudentSpec, kl_order: Sequence[int]) -> list[SizePlan]:
    """Plans the search scores besides the DP's proposals: every size of the KL, ``last`` and
    ``first`` orders, and the student with any one block patched (where the DP is weakest)."""
    return [
        *enumerate_plans(spec, kl_order, origin="klpatch"),
        *(p for o in ("last", "first") for p in enumerate_plans(spec, patch_order(spec, o), origin=o)),
        *(plan_for_patched(spec, [b], origin="one-block") for b in range(spec.num_student_layers)),
    ]


def interim_family(family: Family, layer_counts: Sequence[int], max_ratio: float, blocks: int = CALIB_BLOCKS) -> Family:
    """``family`` (the teacher alone) plus teacher-only layer drops (ShortGPT's, by block influence)
    at ``layer_counts``, kept where their calibration perplexity is within ``max_ratio`` of the
    teacher's: sizes a server can offer in seconds while the student is still being distilled. They
    are named ``l<layers>`` like the sizes they stand in for, carry their calibration perplexity in
    ``plan.meta["calib_ppl"]``, and are listed in ``family.info["interim"]``."""
    from boomerang_core.quality.baselines import block_influence, shortgpt_plan
    from boomerang_core.quality.scoring import perplexities

    store = family.store
    calib = calibration_blocks(store, blocks)
    influence = block_influence(store, calib)
    teacher = family.largest.plan
    drops = [shortgpt_plan(influence, n) for n in sorted(set(layer_counts)) if 0 < n < store.num_teacher_layers]
    ppl = perplexities(store, [teacher, *drops], calib)
    kept = [
        (replace(plan, meta={**plan.meta, "calib_ppl": round(p, 3)}), p)
        for plan, p in zip(drops, ppl[1:], strict=True)
        if p <= max_ratio * ppl[0]
    ]
    plans = [replace(teacher, meta={**teacher.meta, "calib_ppl": round(ppl[0], 3)}), *(plan for plan, _ in kept)]
    out = Family.from_plans(family.name, store, plans, order="interim", **family.info)
    # the teacher is never dominated: it is the size every other one stands in for
    flags = [False, *dominated_flags([s.params for s in out.sizes[1:]], [p for _, p in kept])]
    out.sizes = sorted(
        (replace(s, name=f"l{s.num_layers}", dominated=d) for s, d in zip(out.sizes, flags, strict=True)),
        key=lambda s: s.params,
    )
    out.info["interim"] = [f"l{plan.num_layers}" for plan, _ in kept]
    return out


def family_ready(student: str | Path) -> bool:
    """A finished student with its searched ``family.json``."""
    return finished_student(student) and (Path(student) / FAMILY_FILE).is_file()


# --- the child process a server starts ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m boomerang_core.build",
        description="Build a family (distil, order, search) and report each stage to a status file.",
    )
    parser.add_argument("--status", required=True, help="JSON status file, replaced at each update")
    parser.add_argument("--demo", action="store_true", help="the embedded demo family (in the cache directory)")
    parser.add_argument("--teacher")
    parser.add_argument("--student", help="output directory of the student (and family.json)")
    parser.add_argument("--recipe", help="DistillConfig fields as a JSON object")
    parser.add_argument("--name", default="family")
    parser.add_argument(
        "--metric", default="ppl", choices=("ppl", "chat_kl"),
        help="what chooses the plan at each layer count: calibration perplexity, or KL to the teacher per "
        "response token on its own conversations (needs a chat template)",
    )  # fmt: skip
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--interim-ratio", type=float, default=0.0,
        help="first write interim sizes (teacher-only layer drops within this perplexity factor of the teacher's) "
        "to interim/family.json next to the status file; 0: none",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with contextlib.suppress(OSError):  # a group of its own, so that one signal stops the whole build
        os.setpgid(0, 0)
    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    status: BuildStatus | None = None
    try:
        if args.demo:
            from boomerang_core import demo

            teacher = str(demo.ensure_teacher(progress=True))
            recipe, name, metric = demo.DEMO_RECIPE, demo.DEMO_NAME, demo.DEMO_METRIC
        else:
            if not (args.teacher and args.student):
                parser.error("--teacher and --student (or --demo)")
            recipe = DistillConfig.from_dict(json.loads(args.recipe)) if args.recipe else DistillConfig()
            teacher, name, metric = args.teacher, args.name, args.metric
        stages = build_stages(recipe, metric, interim=args.interim_ratio > 0)
        pending = pending_size_names(teacher, recipe)
        status = BuildStatus(args.status, stages, pending)
        if args.interim_ratio > 0:
            status.stage("interim", "scoring teacher-only layer drops to serve while the student distils")
            layers = [int(n[1:]) for n in pending]
            interim = interim_family(Family.open(teacher, name=name), layers, args.interim_ratio)
            out = Path(args.status).with_name(Path(args.status).stem + "-interim")
            out.mkdir(parents=True, exist_ok=True)
            interim.save(out)
            status.sticky["interim_dir"] = str(out)
            status.progress(1.0, f"interim sizes: {', '.join(interim.info['interim']) or 'none'}")
        if args.demo:
            family_dir = demo.ensure_demo(progress=True, status=status)
        else:
            build_family(teacher, args.student, recipe, name=name, status=status, metric=metric)
            family_dir = Path(args.student)
    except Exception as exc:  # the server reads the reason from the status file
        traceback.print_exc()
        (status or BuildStatus(args.status, ())).failed(f"{type(exc).__name__}: {exc}")
        return 1
    status.done(family_dir)
    print(f"family ready in {family_dir} ({teacher})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
