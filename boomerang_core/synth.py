"""Teacher conversations synthesised by the teacher alone, for distilling what a chat family serves.

The idea is Magpie's (arXiv 2406.08464): an instruct model given only its chat template's *user
prefix* (everything the template writes before a user message's content: the default system prompt
where the template has one, then the user header) writes a plausible user message, because that is
what it was tuned to see there. Sampling that turn until the template's end-of-turn token, then
letting the teacher answer it through its chat template, gives conversations drawn from the teacher
itself, with no external data.

Conversations are filtered (empty, unfinished user turns, special tokens inside a turn, looping
text) and deduplicated on the normalised user message, within a split and across the three splits
(``train``, ``heldout``, ``calib``: different seeds, a message kept in one split is refused by the
others). Answers cut by ``max_new_tokens`` are kept and marked ``finished: False``: they are the
teacher's text, and :func:`conversation_ids` renders them without a closing end-of-turn token.

They are cached as JSON lines under ``<cache root>/conversations/<teacher key>-<settings key>/``,
one file per split, appended one batch at a time behind a marker line: a run killed mid-batch loses
that batch only and a rerun continues from the last marker, with the same seeds it would have used.

Generation is batched: on vLLM's offline ``LLM`` where vLLM is installed and the teacher is a local
HF directory (in a child process, ``python -m boomerang_core.synth``, because vLLM binds the
process's threads and keeps global state), else on transformers' ``generate`` with left padding
(:mod:`boomerang_core.synth_engines`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from boomerang_core.errors import CorpusError
from boomerang_core.synth_engines import Engine, TransformersEngine, VllmEngine

SPLIT_SEEDS = {"train": 0, "heldout": 1, "calib": 2}
# A message found in two splits' caches (two runs at once) stays in the first of these only.
PRIORITY = ("calib", "heldout", "train")
ENGINES = ("auto", "vllm", "transformers")
FILTER_VERSION = 1  # bump when the filters change: the cache key changes with it
_SENTINEL = "\u2063BOOMERANG-USER-CONTENT\u2063"
_SEED_STRIDE = 1_000_000_007  # per-split seed offset: sample i of split s has seed s * stride + i
Progress = Callable[[int, int], None]  # (conversations held, conversations asked for)
PROGRESS_EVERY_S = 3.0  # how often the vLLM child's progress is read from its cache
_STALL_BATCHES = 10  # batches in a row that keep nothing: the teacher cannot give more


@dataclass(frozen=True)
class SynthSettings:
    """How conversations are sampled. Every field is part of the cache key; batch size and engine
    are not (each sample has its own seed: on vLLM the text does not depend on the batch)."""

    max_new_tokens: int = 256  # answer tokens at most; a longer answer is kept, marked unfinished
    user_max_tokens: int = 96  # a user turn that does not end within this is dropped
    user_temperature: float = 1.0  # Magpie samples the instruction at temperature 1, top-p 1
    user_top_p: float = 1.0
    answer_temperature: float = 0.7
    answer_top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.user_max_tokens < 1:
            raise CorpusError("max_new_tokens and user_max_tokens must be at least 1")
        for name in ("user_temperature", "answer_temperature"):
            if getattr(self, name) < 0:
                raise CorpusError(f"{name} must be >= 0")
        for name in ("user_top_p", "answer_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise CorpusError(f"{name} must be in (0, 1]")

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "filters": FILTER_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- the chat template ------------------------------------------------------------------------


def user_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template rendered up to where a first user message's content starts: the default
    system prompt where the template writes one, then the user header."""
    rendered = _render(tokenizer, [{"role": "user", "content": _SENTINEL}])
    if _SENTINEL not in rendered:
        raise CorpusError("the chat template does not write the user message's content")
    return rendered[: rendered.index(_SENTINEL)]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a turn: the token the template writes right after a message's content
    (``<|im_end|>``, ``<|eot_id|>``...) when it is a special token, and the end-of-sequence token."""
    rendered = _render(tokenizer, [{"role": "user", "content": _SENTINEL}])
    after = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :]
    ids: list[int] = []
    if after.strip():
        first = tokenizer(after.lstrip(), add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in _special_ids(tokenizer):
            ids.append(int(first[0]))
    eos = tokenizer.eos_token_id
    for tok in eos if isinstance(eos, list) else [eos]:
        if tok is not None and int(tok) not in ids:
            ids.append(int(tok))
    if not ids:
        raise CorpusError("the tokenizer has no end-of-turn or end-of-sequence token to stop a turn at")
    return ids


def answer_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    return _render(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)


def conversation_text(tokenizer: PreTrainedTokenizerBase, conversation: dict[str, Any]) -> str:
    """A conversation through the chat template; an unfinished answer is left open (no end-of-turn)."""
    messages = conversation["messages"]
    if conversation.get("finished", True):
        return _render(tokenizer, messages)
    return _render(tokenizer, messages[:-1], add_generation_prompt=True) + messages[-1]["content"]


def conversation_ids(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[dict[str, Any]]) -> list[int]:
    """The conversations rendered by the chat template, as one token stream (the template's own
    turn markers separate them; no extra end-of-text token)."""
    if not conversations:
        return []
    texts = [conversation_text(tokenizer, c) for c in conversations]
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
    return stream


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError("the teacher's tokenizer has no chat template: it has no conversations to synthesise")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


# --- filters ----------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """The deduplication key: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def degenerate(text: str, min_words: int = 2) -> bool:
    """Empty, shorter than ``min_words`` words, or looping: in a text of 24 words or more, fewer
    than half of its word 3-grams are distinct (a phrase repeated over and over)."""
    words = text.split()
    if len(words) < min_words:
        return True
    if len(words) >= 24:
        grams = list(zip(words, words[1:], words[2:], strict=False))
        if len(set(grams)) < 0.5 * len(grams):
            return True
    return False


# --- the cache --------------------------------------------------------------------------------


def teacher_key(teacher: str | Path) -> str:
    """A short hash naming the teacher: its config, chat template and weight files (name, size and
    their first and last MiB), or the hub id for a teacher that is not a local path."""
    path = Path(teacher).expanduser()
    h = hashlib.sha256()
    if not path.exists():
        h.update(str(teacher).encode())
        return h.hexdigest()[:12]
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        if f.suffix in (".json", ".jinja"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".gguf", ".bin", ".pt"):
            size = f.stat().st_size
            with f.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
            h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest()[:12]


@dataclass
class SplitCache:
    """One split's JSON-lines file: conversation records, each batch closed by a marker line
    ``{"generated": n, ...}`` (samples drawn so far, kept or not). Records after the last marker
    (a batch cut short) are ignored, and the next write drops them."""

    path: Path

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """The committed conversations and the number of samples drawn so far."""
        if not self.path.is_file():
            return [], 0
        committed: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        generated = 0
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a write cut short
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if "generated" in row:
                    committed.extend(pending)
                    pending = []
                    generated = int(row["generated"])
                else:
                    pending.append(row)
        return committed, generated

    def append(self, rows: list[dict[str, Any]], marker: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_uncommitted()
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*rows, marker])
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_uncommitted(self) -> None:
        """Truncate the file after its last marker line."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = 0
        pos = 0
        for line in data.splitlines(keepends=True):
            pos += len(line)
            if line.endswith(b"\n") and line.startswith(b'{"generated"'):
                end = pos
        if end != len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(end)


def cache_dir_for(teacher: str | Path, settings: SynthSettings, cache_dir: str | Path | None = None) -> Path:
    from boomerang_core.demo import cache_root

    return cache_root(cache_dir) / "conversations" / f"{teacher_key(teacher)}-{settings.key()}"


def _split_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.jsonl"


def _other_keys(folder: Path, split: str) -> set[str]:
    keys: set[str] = set()
    for other in SPLIT_SEEDS:
        if other != split:
            rows, _ = SplitCache(_split_path(folder, other)).read()
            keys.update(normalise(r["messages"][0]["content"]) for r in rows)
    return keys


def _readable(folder: Path, split: str) -> list[dict[str, Any]]:
    """The split's conversations, without any whose user message a split before it in
    :data:`PRIORITY` also holds (two runs at once could write one to both)."""
    higher = PRIORITY[: PRIORITY.index(split)]
    taken = {
        normalise(r["messages"][0]["content"]) for s in higher for r in SplitCache(_split_path(folder, s)).read()[0]
    }
    rows, _ = SplitCache(_split_path(folder, split)).read()
    return [r for r in rows if normalise(r["messages"][0]["content"]) not in taken]


# --- generation -------------------------------------------------------------------------------


def sample_conversations(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    settings: SynthSettings,
    seeds: list[int],
    seen: set[str],
) -> list[dict[str, Any]]:
    """One batch: a user turn per seed from the user prefix, then the teacher's answers to those
    that pass the filters and are not in ``seen`` (which gains the kept ones' keys)."""
    prefix = tokenizer(user_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    users = engine.sample(
        [list(prefix)] * len(seeds), seeds, settings.user_max_tokens, settings.user_temperature, settings.user_top_p
    )
    kept: list[tuple[int, str]] = []
    for seed, (ids, finished) in zip(seeds, users, strict=True):
        text = str(tokenizer.decode(ids)).strip()
        key = normalise(text)
        if not finished or special & set(ids) or degenerate(text, min_words=2) or key in seen:
            continue
        seen.add(key)
        kept.append((seed, text))
    if not kept:
        return []
    prompts = [tokenizer(answer_prompt(tokenizer, u), add_special_tokens=False)["input_ids"] for _, u in kept]
    answers = engine.sample(
        prompts, [s for s, _ in kept], settings.max_new_tokens, settings.answer_temperature, settings.answer_top_p
    )
    rows = []
    for (_, user), (ids, finished) in zip(kept, answers, strict=True):
        text = str(tokenizer.decode(ids)).strip()
        if special & set(ids) or degenerate(text, min_words=1):
            seen.discard(normalise(user))
            continue
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        rows.append({"messages": messages, "finished": finished})
    return rows


def fill_split(
    teacher: str | Path,
    split: str,
    count: int,
    settings: SynthSettings,
    folder: Path,
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    progress: bool,
    on_progress: Progress | None = None,
) -> None:
    """Generate into the split's cache until it holds ``count`` readable conversations; ``on_progress``
    gets (held, count) after each batch."""
    from tqdm.auto import tqdm

    cache = SplitCache(_split_path(folder, split))
    rows, generated = cache.read()
    seen = {normalise(r["messages"][0]["content"]) for r in rows} | _other_keys(folder, split)
    have = len(_readable(folder, split))
    stalled = 0
    with tqdm(
        total=count, initial=min(have, count), unit="conv", desc=f"teacher conversations ({split}, {engine.name})",
        disable=not progress,
    ) as bar:  # fmt: skip
        while have < count:
            seeds = [SPLIT_SEEDS[split] * _SEED_STRIDE + generated + j for j in range(batch_size)]
            new = sample_conversations(engine, tokenizer, settings, seeds, seen)
            generated += batch_size
            cache.append(new, {"generated": generated, "kept": len(new), "engine": engine.name})
            have += len(new)
            bar.update(min(len(new), max(0, count - bar.n)))
            if on_progress is not None:
                on_progress(min(have, count), count)
            bar.set_postfix(kept=f"{have}/{generated}", refresh=False)
            stalled = 0 if new else stalled + 1
            if stalled >= _STALL_BATCHES:
                raise CorpusError(
                    f"the teacher gave no new conversation in {stalled} batches of {batch_size} "
                    f"({have} kept of {generated} sampled): every new one was empty, looping or a repeat"
                )


def resolve_engine(teacher: str | Path, engine: str = "auto") -> str:
    """``auto``: vLLM where it is installed and the teacher is a local HF directory, else transformers."""
    if engine not in ENGINES:
        raise CorpusError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "auto":
        return engine
    local = (Path(teacher).expanduser() / "config.json").is_file()
    return "vllm" if local and importlib.util.find_spec("vllm") is not None else "transformers"


def teacher_conversations(
    teacher: str | Path,
    count: int,
    *,
    split: str = "train",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_new_tokens: int = SynthSettings.max_new_tokens,
    batch_size: int = 32,
    engine: str = "auto",
    settings: SynthSettings | None = None,
    on_progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """``count`` conversations the teacher wrote itself, ``{"messages": [user, assistant], "finished": bool}``
    (``finished``: the answer reached its end-of-turn token within ``max_new_tokens``).

    The first ``count`` of the split's cache, generating what is missing (resumable, with a progress
    bar). The same teacher, settings and split give the same list, and a larger ``count`` extends it.
    ``settings`` overrides ``max_new_tokens``; ``engine`` is ``auto``, ``vllm`` or ``transformers``.
    ``on_progress`` gets (conversations held, ``count``) as they are written (every batch, or every
    few seconds from the vLLM child).
    """
    if split not in SPLIT_SEEDS:
        raise CorpusError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    if count < 0 or batch_size < 1:
        raise CorpusError("count must be >= 0 and batch_size >= 1")
    settings = settings or SynthSettings(max_new_tokens=max_new_tokens)
    folder = cache_dir_for(teacher, settings, cache_dir)
    rows = _readable(folder, split)
    if len(rows) < count:
        _write_meta(folder, teacher, settings)
        chosen = resolve_engine(teacher, engine)
        if chosen == "vllm" and not _vllm_child(
            teacher, split, count, settings, folder, batch_size, progress, on_progress=on_progress
        ):
            if engine == "vllm":
                raise CorpusError("vLLM could not generate the teacher's conversations (see its output above)")
            warnings.warn("vLLM could not generate the conversations: falling back to transformers", stacklevel=2)
            chosen = "transformers"
        if chosen == "transformers":
            from boomerang_core.loading import load_tokenizer

            tokenizer = load_tokenizer(teacher)
            hf = TransformersEngine(teacher, end_of_turn_ids(tokenizer))
            fill_split(teacher, split, count, settings, folder, hf, tokenizer, batch_size, progress, on_progress)
        rows = _readable(folder, split)
    return [{"messages": r["messages"], "finished": bool(r.get("finished", True))} for r in rows[:count]]


def _write_meta(folder: Path, teacher: str | Path, settings: SynthSettings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": str(teacher), "settings": dataclasses.asdict(settings), "filters": FILTER_VERSION}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _vllm_child(
    teacher: str | Path,
    split: str,
    count: int,
    settings: SynthSettings,
    folder: Path,
    batch_size: int,
    progress: bool,
    on_progress: Progress | None = None,
) -> bool:
    """Run the generation in ``python -m boomerang_core.synth``; True when it succeeded. ``on_progress``
    gets what the split's cache holds every few seconds while it runs."""
    argv = [
        sys.executable, "-m", "boomerang_core.synth", str(teacher), "--split", split, "--count", str(count),
        "--folder", str(folder), "--batch-size", str(batch_size),
        "--settings", json.dumps(dataclasses.asdict(settings)),
    ]  # fmt: skip
    if not progress:
        argv.append("--quiet")
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM's automatic binding keeps a core back for a scheduler process; here the engine core
    # runs on the model's thread, so its compute threads get every core this process may use.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: nothing blocks the child while we poll
        proc = subprocess.Popen(argv, env=env, stdout=None if progress else out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=PROGRESS_EVERY_S)
                if on_progress is not None:
                    on_progress(min(len(_readable(folder, split)), count), count)
        except BaseException:  # interrupted (or a failing callback): the child does not outlive us
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0 and not progress:
            out.seek(0)
            sys.stderr.write(out.read().decode(errors="replace")[-4000:])
    return proc.returncode == 0


def _child(argv: Sequence[str] | None = None) -> int:
    """The vLLM child: fill one split's cache, then exit."""
    ap = argparse.ArgumentParser(prog="python -m boomerang_core.synth")
    ap.add_argument("teacher")
    ap.add_argument("--split", required=True, choices=sorted(SPLIT_SEEDS))
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    from boomerang_core.loading import load_config, load_tokenizer

    settings = SynthSettings(**json.loads(a.settings))
    tokenizer = load_tokenizer(a.teacher)
    prefix_len = len(tokenizer(user_prefix(tokenizer), add_special_tokens=False)["input_ids"])
    needed = prefix_len + settings.user_max_tokens + 32 + settings.max_new_tokens  # 32: the template's markers
    context = int(getattr(load_config(a.teacher), "max_position_embeddings", needed) or needed)
    engine = VllmEngine(a.teacher, end_of_turn_ids(tokenizer), min(needed, context), a.batch_size)
    fill_split(a.teacher, a.split, a.count, settings, a.folder, engine, tokenizer, a.batch_size, not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
