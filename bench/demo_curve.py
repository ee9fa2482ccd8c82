"""The demo family's curve: held-out perplexity of every size, both baselines, three patch orders.

    .venv/bin/python bench/demo_curve.py                 # 6,144 held-out tokens, writes bench/results/
    .venv/bin/python bench/demo_curve.py --tokens 2048 --threads 1

Needs the distilled demo student in the cache (``boomerang distill`` builds it); it does not start
a distillation itself unless ``--build`` is given. On a busy machine the teacher-only baselines
(ShortGPT at every layer count, pruned-only plans of the ``last`` and ``first`` orders) can be
scored first, while the student is still distilling, and reused::

    .venv/bin/python bench/demo_curve.py --tokens 2048 --teacher-baselines /tmp/baselines.json
    .venv/bin/python bench/demo_curve.py --tokens 2048 --known /tmp/baselines.json

Writes ``demo_curve.md`` and ``demo_curve.png`` and records the perplexities and dominated marks
into the cached ``family.json`` so that ``boomerang sizes`` shows them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from boomerang_core import demo
from boomerang_core.alignment import StudentSpec
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.plan import enumerate_plans, patch_order
from boomerang_core.quality.baselines import block_influence, shortgpt_plan, undistilled_plan
from boomerang_core.quality.curve import evaluate_family
from boomerang_core.quality.klpatch import KLPatchResult, klpatch_search
from boomerang_core.quality.scoring import perplexities
from boomerang_core.store import LayerStore

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=6144, help="held-out tokens to score (default 6144)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per held-out block (default 256)")
    ap.add_argument("--batch-size", type=int, default=4, help="blocks per forward (default 4)")
    ap.add_argument("--orders", default="last,first,klpatch", help="patch orders to compare")
    ap.add_argument("--search", action="store_true", help="search the KLPatch order again even if saved")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--build", action="store_true", help="build the demo family first if it is missing")
    ap.add_argument("--out", default=str(RESULTS), help="folder for demo_curve.md and demo_curve.png")
    ap.add_argument("--teacher-baselines", metavar="JSON", help="only score the teacher-only baselines into JSON")
    ap.add_argument("--known", metavar="JSON", help="perplexities from --teacher-baselines to reuse")
    ap.add_argument("--save-known", metavar="JSON", help="write every perplexity measured, for --known")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.teacher_baselines:
        return teacher_baselines(a, Path(a.teacher_baselines))

    t0 = time.perf_counter()
    student_dir = demo.demo_dir() / "student"
    has_family = (student_dir / FAMILY_FILE).is_file()
    if not has_family and a.build:
        student_dir, has_family = demo.ensure_demo(progress=True), True
    if not (student_dir / "model.safetensors").is_file():
        print("the demo student is not distilled yet; run `boomerang distill` or pass --build")
        return 1
    store = LayerStore.load(student_dir.parent / "teacher", student_dir)
    if has_family:
        family = Family.load(student_dir, store)
        loaded_mtime = (student_dir / FAMILY_FILE).stat().st_mtime
    else:  # distilled, patch order not chosen yet: score the fixed orders, leave the cache alone
        print(f"no {FAMILY_FILE} yet: the family's sizes are the `last` order", flush=True)
        family = Family.from_store(demo.DEMO_NAME, store, order="last")
    heldout_ids, calib_ids = _blocks(store.tokenizer, a)
    print(f"loaded in {time.perf_counter() - t0:.0f} s; held-out {tuple(heldout_ids.shape)}", flush=True)

    orders = tuple(o.strip() for o in a.orders.split(",") if o.strip())
    klpatch = None
    saved = family.info.get("patch_order")
    if "klpatch" in orders:
        if family.order == "klpatch" and saved and not a.search:
            klpatch = KLPatchResult(order=list(saved), kl=[], seconds=math.nan)
        else:
            klpatch = klpatch_search(store, calib_ids, progress=True)
            print(f"klpatch: {klpatch.order} in {klpatch.seconds / 60:.1f} min", flush=True)
    known = None
    if a.known:
        data = json.loads(Path(a.known).read_text())
        if data["heldout_sha1"] != _sha1(heldout_ids):
            print(f"{a.known} was scored on other held-out tokens; pass the same --tokens and --seq-len")
            return 1
        known = data["perplexity"]
    result = evaluate_family(family, heldout_ids, calib_ids, orders=orders, klpatch_result=klpatch, known=known)
    if has_family and (student_dir / FAMILY_FILE).stat().st_mtime == loaded_mtime:
        family.save(student_dir)
    elif has_family:
        print(f"{FAMILY_FILE} changed while evaluating (a new patch order?): not overwritten")
    if a.save_known:
        _save_known(Path(a.save_known), heldout_ids, result.scores)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        "# Demo family curve",
        "",
        f"Teacher: the demo teacher (`{demo.GGUF_FILE}`). Student: distilled by `boomerang distill`, "
        f"{family.info.get('steps_trained', '?')} optimizer steps (recipe in the cached `distill_config.json`). "
        f"Produced by `bench/demo_curve.py --tokens {a.tokens} --orders {a.orders}` on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}, {torch.get_num_threads()} torch threads, load "
        f"average {load:.1f} at the end: the machine was shared), in {(time.perf_counter() - t0) / 60:.1f} min.",
        "",
    ]
    (out / "demo_curve.md").write_text("\n".join(header) + "\n" + result.to_markdown())
    result.plot(out / "demo_curve.png")
    print(family.table())
    print(f"wrote {out / 'demo_curve.md'} and {out / 'demo_curve.png'}")
    return 0


def _blocks(tokenizer: object, a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    _, heldout, calib = corpus_texts(None)
    heldout_ids = token_blocks(tokenizer, heldout, a.seq_len, max_blocks=max(1, a.tokens // a.seq_len))  # type: ignore[arg-type]
    calib_ids = token_blocks(tokenizer, calib, a.seq_len, max_blocks=demo.CALIB_BLOCKS)  # type: ignore[arg-type]
    return heldout_ids, calib_ids


def _sha1(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.numpy().tobytes()).hexdigest()


def teacher_baselines(a: argparse.Namespace, path: Path) -> int:
    """Score the plans that use teacher layers only: they need no student."""
    store = LayerStore.load(demo.ensure_teacher(progress=True))
    recipe = demo.DEMO_RECIPE
    spec = StudentSpec.from_pruning(
        store.num_teacher_layers, recipe.first_layers_to_keep, recipe.every_n, recipe.last_layers_to_keep
    )
    heldout_ids, calib_ids = _blocks(store.tokenizer, a)
    influence = block_influence(store, calib_ids, progress=True)
    plans = [shortgpt_plan(influence, n) for n in range(spec.num_student_layers, store.num_teacher_layers + 1)]
    for order in ("last", "first"):
        plans += [undistilled_plan(p, spec) for p in enumerate_plans(spec, patch_order(spec, order))]
    unique = list({p.key: p for p in plans}.values())
    values = perplexities(store, unique, heldout_ids, batch_size=a.batch_size, progress=True)
    _save_known(path, heldout_ids, {p.key: v for p, v in zip(unique, values, strict=True)})
    return 0


def _save_known(path: Path, heldout_ids: torch.Tensor, scores: dict[str, float]) -> None:
    path.write_text(json.dumps({"heldout_sha1": _sha1(heldout_ids), "perplexity": scores}, indent=1))
    print(f"wrote {len(scores)} perplexities to {path}")


if __name__ == "__main__":
    sys.exit(main())
