"""The searched Pareto front of the demo family against ShortGPT, the fixed patch orders and the
undistilled baseline, at every layer count from the student's to the teacher's.

    .venv/bin/python bench/demo_front.py [--student DIR] [--heldout-blocks 8] [--k-best 2] [--install] [--threads 1]

Writes ``bench/results/demo_front.md`` and ``.png`` and the front as a family
(``bench/results/demo_front_family/family.json``). Calibration text (the search) and held-out
text (every perplexity here) are the corpus's disjoint calib and held-out splits. Held-out
perplexities come from :func:`boomerang_core.quality.scoring.score_plans`, which counts tokens exactly as
:func:`boomerang_core.quality.scoring.perplexity` does (tested) but runs shared layer prefixes once.
On a busy 2-core machine ``--threads 1`` is several times faster than two threads.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from boomerang_core.assemble import build
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.demo import (
    CALIB_BLOCKS,
    DEMO_NAME,
    SEARCH_CALIB_BLOCKS,
    SEARCH_K_BEST,
    demo_dir,
    demo_family_from_search,
    search_seeds,
)
from boomerang_core.distill import RECIPE_FILE
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.plan import SizePlan, enumerate_plans, patch_order, plan_for_patched
from boomerang_core.quality.baselines import shortgpt_plan, undistilled_plan
from boomerang_core.quality.klpatch import klpatch_order
from boomerang_core.quality.scoring import score_plans, teacher_pass
from boomerang_core.quality.search import SearchResult, edge_costs, family_from_search, search
from boomerang_core.store import LayerStore, unique_storage_bytes

RESULTS = Path(__file__).parent / "results"
PlanKey = str  # SizePlan.key
ORDERS = ("last", "first", "klpatch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=None, help="student directory (default: the demo cache's)")
    ap.add_argument(
        "--calib-blocks", type=int, default=SEARCH_CALIB_BLOCKS, help="calibration blocks of --seq-len tokens"
    )
    ap.add_argument("--heldout-blocks", type=int, default=8, help="held-out blocks of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k-best", type=int, default=SEARCH_K_BEST, help="DP paths per layer count scored by the true KL")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_front")
    ap.add_argument("--skip-klpatch", action="store_true", help="no KL order unless the student's family.json has one")
    ap.add_argument(
        "--late-klpatch",
        action="store_true",
        help="with --skip-klpatch: look for the family.json KL order again after the search and score it then "
        "(on held-out text only; it is then not a seed of the search)",
    )
    ap.add_argument(
        "--install",
        action="store_true",
        help="save the front as the served demo family (the student's family.json), exactly as the demo's own "
        "first-run search would, so serving does not search again",
    )
    ap.add_argument(
        "--baselines-only",
        action="store_true",
        help="only score the teacher-only baselines (ShortGPT, undistilled) into the cache and stop; they do "
        "not depend on the student, so this can run while the student is being distilled",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    student_dir = a.student or demo_dir() / "student"
    store = LayerStore.load(demo_dir() / "teacher", student_dir)
    spec, tok = store.spec, store.tokenizer
    assert spec is not None and tok is not None
    _, heldout, calib = corpus_texts()
    calib_ids = token_blocks(tok, calib, a.seq_len, max_blocks=a.calib_blocks)
    heldout_ids = token_blocks(tok, heldout, a.seq_len, max_blocks=a.heldout_blocks)

    lo, hi = spec.num_student_layers, store.num_teacher_layers
    orders = {o: enumerate_plans(spec, patch_order(spec, o), origin=o) for o in ("last", "first")}
    undistilled = [undistilled_plan(p, spec) for p in orders["last"]]
    cache = ScoreCache(demo_dir() / "teacher_plan_scores.json", heldout_ids)
    if a.baselines_only:
        influence = edge_costs(store, teacher_pass(store, calib_ids)).skip
        baselines = [shortgpt_plan(influence, n) for n in range(lo, hi + 1)] + undistilled
        cache.perplexities(store, baselines)
        print(f"scored {len(baselines)} teacher-only plans into {cache.path}")
        return

    clock = time.perf_counter()
    kl_order, kl_source = saved_kl_order(student_dir)
    if kl_order is None and not a.skip_klpatch:
        kl_order, kl_source = klpatch_order(store, calib_ids[:CALIB_BLOCKS]), "searched here"
    klpatch_s = time.perf_counter() - clock
    if kl_order is not None:
        orders["klpatch"] = enumerate_plans(spec, kl_order, origin="klpatch")
    if kl_order is not None:  # exactly the seeds the demo family's own search uses
        seeds = search_seeds(spec, kl_order)
    else:
        seeds = [p for plans in orders.values() for p in plans]
        seeds += [plan_for_patched(spec, [b], origin="one-block") for b in range(spec.num_student_layers)]

    clock = time.perf_counter()
    result = search(store, calib_ids, k_best=a.k_best, seeds=seeds, progress=True)
    search_s = time.perf_counter() - clock
    shortgpt = {n: shortgpt_plan(result.costs.skip, n) for n in range(lo, hi + 1)}

    clock = time.perf_counter()
    ppl = cache.perplexities(store, [*result.plans, *shortgpt.values(), *seeds, *undistilled])
    if kl_order is None and a.late_klpatch:
        kl_order, kl_source = saved_kl_order(student_dir)
        if kl_order is not None:
            kl_source += ", read after the search (not a seed)"
            orders["klpatch"] = enumerate_plans(spec, kl_order, origin="klpatch")
            ppl.update(cache.perplexities(store, orders["klpatch"]))
    heldout_s = time.perf_counter() - clock

    tokens = {"calib": int(calib_ids.numel()), "heldout": int(heldout_ids.numel())}
    family = family_from_search(
        DEMO_NAME, store, result, [ppl[p.key] for p in result.plans], k_best=a.k_best, tokens=tokens
    )
    before = store.resident_bytes()
    built = [build(s.plan, store) for s in family.sizes]
    memory = {"before": before, "after": store.resident_bytes(), "built_unique": unique_storage_bytes(built)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    saved = family.save(mkdir(a.out.with_name(a.out.name + "_family")))

    rows = table_rows(family, ppl, shortgpt, orders, undistilled, lo, hi)
    timing = {"klpatch": klpatch_s, "search": search_s, "heldout": heldout_s, **result.seconds}
    md = report(family, result, rows, memory, timing, tokens, a, kl_order, kl_source, saved)
    if a.install:
        if kl_order is None:
            raise SystemExit("--install needs the KL order (drop --skip-klpatch)")
        served = demo_family_from_search(store, result, kl_order, tokens["calib"])
        recipe = student_dir / RECIPE_FILE
        if recipe.is_file():
            served.info["recipe"] = json.loads(recipe.read_text())
        served.save(student_dir)
        print(f"installed the front as the served demo family in {student_dir}", flush=True)
    md += served_check(student_dir, family)
    a.out.with_suffix(".md").write_text(md)
    plot(rows, a.out.with_suffix(".png"))
    print(md)


class ScoreCache:
    """Held-out perplexities of teacher-only plans, kept between runs: they do not depend on the
    student. Keyed by a hash of the held-out token ids and the plan's layers and parts."""

    def __init__(self, path: Path, heldout_ids: torch.Tensor) -> None:
        self.path = path
        self.heldout_ids = heldout_ids
        self.tag = hashlib.sha1(heldout_ids.numpy().tobytes()).hexdigest()[:12]
        self.data: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def key(self, plan: SizePlan) -> str:
        return f"{self.tag}|{plan.embed}|{plan.norm}|{plan.head}|{plan.describe()}"

    def perplexities(self, store: LayerStore, plans: list[SizePlan]) -> dict[PlanKey, float]:
        """Held-out perplexity of every plan, scoring only those not cached (one shared-prefix walk)."""
        out = {p.key: self.data[self.key(p)] for p in plans if self.key(p) in self.data}
        todo = list({p.key: p for p in plans if p.key not in out}.values())
        print(f"held-out: {len(out)} plans cached, {len(todo)} to score", flush=True)
        scores = score_plans(store, todo, self.heldout_ids, progress=True, desc="held-out")
        for p, score in zip(todo, scores, strict=True):
            out[p.key] = math.exp(score.nll)
            if p.sources() == {"teacher"}:
                self.data[self.key(p)] = out[p.key]
        self.path.write_text(json.dumps(self.data, indent=0))
        return out


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in reports)."""
    root = Path(__file__).resolve().parent.parent
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else path.name


def saved_kl_order(student_dir: Path) -> tuple[list[int] | None, str]:
    """The KLPatch order the demo build saved in the student's family.json, if any."""
    path = student_dir / FAMILY_FILE
    if not path.is_file():
        return None, ""
    order = json.loads(path.read_text()).get("info", {}).get("patch_order")
    return (list(order), "the demo family's family.json") if order else (None, "")


@dataclass
class Row:
    """Held-out perplexities at one layer count (``None``: that curve has no plan there)."""

    layers: int
    front: float | None
    dominated: bool
    student_layers: int
    origin: str
    plan: str
    shortgpt: float
    orders: dict[str, float | None]
    undistilled: float | None

    @property
    def best_order(self) -> float | None:
        vals = [v for v in self.orders.values() if v is not None]
        return min(vals) if vals else None


def table_rows(
    family: Family,
    ppl: dict[PlanKey, float],
    shortgpt: dict[int, SizePlan],
    orders: dict[str, list[SizePlan]],
    undistilled: list[SizePlan],
    lo: int,
    hi: int,
) -> list[Row]:
    """One row per layer count; an order's value is its best size with that many layers."""

    def best_at(plans: list[SizePlan], n: int) -> float | None:
        vals = [ppl[p.key] for p in plans if p.num_layers == n]
        return min(vals) if vals else None

    by_layers = {s.num_layers: s for s in family.sizes}
    rows = []
    for n in range(lo, hi + 1):
        size = by_layers.get(n)
        rows.append(
            Row(
                layers=n,
                front=size.perplexity if size else None,
                dominated=bool(size and size.dominated),
                student_layers=sum(r.source == "student" for r in size.plan.layers) if size else 0,
                origin=size.plan.origin if size else "",
                plan=size.plan.describe() if size else "",
                shortgpt=ppl[shortgpt[n].key],
                orders={o: best_at(plans, n) for o, plans in orders.items()},
                undistilled=best_at(undistilled, n),
            )
        )
    return rows


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def report(
    family: Family,
    result: SearchResult,
    rows: list[Row],
    memory: dict[str, int],
    timing: dict[str, float],
    tokens: dict[str, int],
    a: argparse.Namespace,
    kl_order: list[int] | None,
    kl_source: str,
    saved: Path,
) -> str:
    cols = ["layers", "front", "ShortGPT", "front vs ShortGPT", "last", "first", "KL", "best order", "undistilled"]
    lines = [
        "# The searched front of the demo family",
        "",
        "Held-out perplexity (token level, Python-docs held-out split, "
        f"{tokens['heldout']:,} tokens) at every layer count from the student's to the teacher's. "
        f"**front**: the plan with the lowest calibration NLL the search found at that count (calibration split, "
        f"{tokens['calib']:,} tokens, disjoint from the held-out text); **ShortGPT**: the teacher with its lowest "
        "block-influence layers dropped; **last / first / KL**: the best size of that fixed patch order with that "
        "many layers; **undistilled**: the `last` order's plans on the pruned, not distilled student.",
        "",
        "| " + " | ".join(cols) + " | student layers | plan from | dominated |",
        "|" + " --- |" * (len(cols) + 3),
    ]
    for r in rows:
        gain = f"{(r.front / r.shortgpt - 1) * 100:+.1f}%" if r.front is not None else "-"
        cells = [str(r.layers), fmt(r.front), fmt(r.shortgpt), gain, *(fmt(r.orders.get(o)) for o in ORDERS)]
        cells += [fmt(r.best_order), fmt(r.undistilled), str(r.student_layers), r.origin, "yes" if r.dominated else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", "", *verdicts(rows)]
    lines += ["", "## What the search costs and how it chose", "", *search_notes(result, timing, a)]
    lines += [
        "",
        "## Memory",
        "",
        f"- Store resident bytes before building the {len(family.sizes)} front sizes: {memory['before']:,}; "
        f"after building all of them (held at once): {memory['after']:,} "
        f"({'no change' if memory['after'] == memory['before'] else 'CHANGED'}).",
        f"- Unique storages behind all built sizes together: {memory['built_unique']:,} bytes "
        f"({'within' if memory['built_unique'] <= memory['before'] else 'MORE THAN'} the store's).",
    ]
    lines += ["", "## The front's plans", ""]
    lines += [f"- `l{r.layers}` ({r.origin}): {r.plan}" for r in rows]
    lines += [
        "",
        (f"KL patch order ({kl_source}): {kl_order}." if kl_order else "No KL patch order was available.")
        + " The front is saved as a family in "
        f"`{shown(saved)}` "
        "(plans, held-out perplexity, calibration KL, dominated marks).",
        "",
        f"Command: `.venv/bin/python bench/demo_front.py {command_flags(a)}`",
    ]
    return "\n".join(lines) + "\n"


def served_check(student_dir: Path, front: Family) -> str:
    """Whether the family the gateway serves (the student's family.json) is this front: same plan
    at every layer count, and which of its sizes it marks dominated (by calibration perplexity)."""
    path = student_dir / FAMILY_FILE
    served = json.loads(path.read_text()) if path.is_file() else None
    if served is None or served.get("order") != "search":
        return "\nThe served demo family is not a searched front (no `family.json` of order `search`).\n"
    plans = {SizePlan.from_dict(s["plan"]).describe(): s for s in served["sizes"]}
    same = [s.name for s in front.sizes if s.plan.describe() in plans]
    dominated = [s["name"] for s in served["sizes"] if s.get("dominated")]
    verdict = "yes" if len(same) == len(front.sizes) == len(plans) else f"NO: only {same} match"
    return (
        f"\nThe served demo family (`family.json` in the cache, searched by `boomerang_core.demo`) has the same plan "
        f"at every layer count as this front: {verdict}. It marks {dominated or 'no size'} dominated (by calibration "
        "perplexity) and routes only to the rest.\n"
    )


def command_flags(a: argparse.Namespace) -> str:
    """The run's flags, without this machine's paths."""
    flags = f"--calib-blocks {a.calib_blocks} --heldout-blocks {a.heldout_blocks} --seq-len {a.seq_len} "
    flags += f"--k-best {a.k_best} --threads {a.threads}"
    flags += " --skip-klpatch" * a.skip_klpatch + " --late-klpatch" * a.late_klpatch
    return flags + " --student DIR" * (a.student is not None)


def verdicts(rows: list[Row]) -> list[str]:
    served = [r for r in rows if not r.dominated and r.front is not None]
    rises = [(a.layers, b.layers) for a, b in itertools.pairwise(served) if b.front >= a.front]  # type: ignore[operator]
    worse = [r.layers for r in rows if r.front is not None and r.front > r.shortgpt]
    mixed = [r for r in rows if r.student_layers and r.front is not None]
    out = [
        f"- Strictly monotone over the {len(served)} served sizes: {'yes' if not rises else f'NO, rises at {rises}'}; "
        f"dominated sizes: {[r.layers for r in rows if r.dominated] or 'none'}.",
        f"- Worse than ShortGPT on held-out text at: {worse or 'no size'}.",
    ]
    if mixed:
        gains = [(1 - r.front / r.shortgpt) * 100 for r in mixed]  # type: ignore[operator]
        out.append(
            f"- Uses student layers at {len(mixed)} of {len(rows)} sizes ({[r.layers for r in mixed]}); there it is "
            f"{min(gains):.1f}% to {max(gains):.1f}% below ShortGPT's perplexity (mean {sum(gains) / len(gains):.1f}%)."
        )
    else:
        out.append("- Uses no student layer at any size: the front is teacher-only (dropped layers).")
    return out


def search_notes(result: SearchResult, timing: dict[str, float], a: argparse.Namespace) -> list[str]:
    by_n = result.by_layers()
    winners = {p.num_layers: p for p in result.plans}
    won_rank: dict[str, int] = {}
    top = {1: 0.0, 2: 0.0, a.k_best: 0.0}
    for n, cands in by_n.items():
        w = winners[n]
        label = f"DP rank {w.meta['dp_rank']}" if w.meta.get("dp_rank") is not None else f"seed ({w.origin})"
        won_rank[label] = won_rank.get(label, 0) + 1
        for k in top:
            ranked = [c.kl for c in cands if c.rank is not None and c.rank < k]
            top[k] += min(ranked) if ranked else math.nan
    n_counts = len(by_n)
    minutes = timing["search"] / 60
    seeded = sum(p.meta["calib_kl"] for p in result.plans) / n_counts
    return [
        f"- Search: {minutes:.1f} min on this machine ({len(result.candidates)} plans scored by KL; teacher pass "
        f"{timing['teacher_pass']:.0f} s, edge costs {timing['edge_costs']:.0f} s, DP {timing['dp']:.2f} s, "
        f"KL scoring {timing['scoring']:.0f} s). KL order: {timing['klpatch']:.0f} s; "
        f"held-out scoring of every plan above: {timing['heldout'] / 60:.1f} min.",
        f"- Which proposal won, per layer count: {dict(sorted(won_rank.items()))}.",
        "- Mean calibration KL (nats/position) over the layer counts if only the DP's top-k were scored: "
        + ", ".join(f"k={k}: {v / n_counts:.4f}" for k, v in sorted(top.items()))
        + f"; with ShortGPT, the fixed orders and every one-block patching as seeds too: {seeded:.4f}.",
        "- Why this design: edge costs make the DP a cheap proposer (47 layer passes, milliseconds of DP), but "
        "errors compound along a path, so only the true KL decides; scoring shares every layer prefix, and the "
        "LM head pass per plan is the main cost here, which bounds how many proposals per count are affordable.",
    ]


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    curves: list[tuple[str, str, float, list[float | None]]] = [
        ("front (searched)", "k-", 2.5, [r.front for r in rows]),
        ("ShortGPT", "C3--", 1.5, [r.shortgpt for r in rows]),
        ("last-k", "C0:", 1.2, [r.orders.get("last") for r in rows]),
        ("first-k", "C1:", 1.2, [r.orders.get("first") for r in rows]),
        ("KL order", "C2-.", 1.5, [r.orders.get("klpatch") for r in rows]),
        ("undistilled (last)", "C7:", 1.0, [r.undistilled for r in rows]),
    ]
    for label, style, width, values in curves:
        pts = [(r.layers, v) for r, v in zip(rows, values, strict=True) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=width, marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Demo family: searched front vs baselines")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
