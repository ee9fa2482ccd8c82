"""Chat-aware evaluation on a tiny family: the question set and its matching rule, the response-token
mask, chat KL against full forwards, greedy answers against the plain model, the search by chat KL,
the teacher as the largest size, and the eval report's chat section."""

from __future__ import annotations

import copy
import math
import re
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build
from boomerang_core.family import Family
from boomerang_core.plan import SizePlan, plan_for_patched, teacher_plan
from boomerang_core.quality.chat import chat_scores, chat_set, general_blocks, general_texts, render_conversation
from boomerang_core.quality.chateval import evaluate_chat
from boomerang_core.quality.curve import evaluate_cli, evaluate_family
from boomerang_core.quality.qa import QA_FILE, QAItem, answer_matches, answer_questions, chat_prompts, load_qa
from boomerang_core.quality.search import (
    Candidate,
    EdgeCosts,
    SearchResult,
    family_from_search,
    search,
    select_for_metric,
)
from boomerang_core.store import LayerStore
from tests.tiny import noisy_pair, tiny_tokenizer

LAYERS = 6
PROMPTS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "How do I read a file in Python?",
    "Write a short poem about the sea.",
    "What is 2 + 2?",
    "Tell me about lists.",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair() -> tuple[PreTrainedModel, PreTrainedModel, StudentSpec]:
    return noisy_pair(LAYERS)  # blocks [0, 1], [2, 3], [4], [5]


@pytest.fixture(scope="module")
def store(pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec]) -> LayerStore:
    teacher, student, spec = pair
    return LayerStore.from_models(copy.deepcopy(teacher), copy.deepcopy(student), spec, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def conversations(pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec]) -> list[dict[str, Any]]:
    """The tiny teacher's own greedy replies to a few prompts, of different lengths."""
    teacher = pair[0]
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            text = chat_prompts(tok, [prompt])[0]
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = teacher.generate(ids, max_new_tokens=6 + 3 * i, do_sample=False, pad_token_id=0)
            reply = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return out


# --- the question set ---------------------------------------------------------------------------


def test_answer_matching_rule() -> None:
    assert answer_matches("The capital of France is Paris.", ["Paris"])
    assert answer_matches("PARIS", ["paris"])
    assert answer_matches("2 + 2 = 4", ["4", "four"])
    assert not answer_matches("2 + 2 = 14", ["4"])  # a whole word, not a part of one
    assert not answer_matches("a category", ["cat"])
    assert answer_matches("It is in New  York.", ["new york"])  # any whitespace inside a phrase
    assert answer_matches("¡Hola!", ["hola"])
    assert answer_matches("Se dice adiós.", ["adiós"]) and not answer_matches("adiósa", ["adiós"])
    assert not answer_matches("", ["Paris"])


def test_question_set_is_shipped_and_well_formed() -> None:
    items = load_qa()
    assert len(items) >= 100
    assert len({it.question for it in items}) == len(items)
    assert len({it.topic for it in items}) >= 6
    for it in items:
        # a reply that only repeats the question never counts as correct
        assert not answer_matches(it.question, it.answers), it
    package_data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert QA_FILE.name in package_data["package-data"]["boomerang_core.quality"]
    assert QA_FILE.parent.name == "quality"


def test_greedy_answers_are_the_plain_models(
    pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec], store: LayerStore
) -> None:
    """The teacher's plan answers, batched and left-padded, what the teacher model itself answers
    one question at a time; the correct flags follow the rule."""
    items = [QAItem(q, ("the",)) for q in PROMPTS[:4]]
    (result,) = answer_questions(store, [teacher_plan(LAYERS)], items, max_new_tokens=5, batch_size=3)
    tok = tiny_tokenizer()
    with torch.no_grad():
        for item, reply in zip(items, result.replies, strict=True):
            ids = tok(chat_prompts(tok, [item.question])[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = pair[0].generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert reply == tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert result.correct == [answer_matches(r, ["the"]) for r in result.replies]
    assert result.accuracy == sum(result.correct) / 4


# --- chat KL --------------------------------------------------------------------------------------


def test_response_mask_marks_the_assistant_content_and_its_end(conversations: list[dict[str, Any]]) -> None:
    tok = tiny_tokenizer()
    for conv in conversations:
        ids, response = render_conversation(tok, conv["messages"])
        marked = [i for i, r in zip(ids, response, strict=True) if r]
        assert tok.decode(marked) == conv["messages"][1]["content"] + "<|im_end|>"
        first = response.index(True)
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")  # the prompt is not counted
    chat = chat_set(tok, conversations)
    assert chat.conversations == len(conversations)
    assert not chat.mask[:, -1].any()
    lengths = (chat.ids != tok.pad_token_id).sum(1)
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)  # longest first: little padding per batch
    unfinished = chat_set(tok, [{**conversations[0], "finished": False}])
    assert unfinished.response_tokens == chat_set(tok, conversations[:1]).response_tokens - 1


@torch.no_grad()
def test_chat_kl_matches_full_forwards(store: LayerStore, conversations: list[dict[str, Any]]) -> None:
    """KL(teacher || plan) per response token from the masked prefix-sharing scorer equals the
    same mean from full forwards of each conversation alone (no padding)."""
    tok = tiny_tokenizer()
    spec = store.spec
    assert spec is not None
    plans = [plan_for_patched(spec, []), plan_for_patched(spec, [2]), teacher_plan(LAYERS)]
    scores = chat_scores(store, plans, chat_set(tok, conversations), batch_size=4)
    teacher = build(teacher_plan(LAYERS), store)
    for plan, score in zip(plans, scores, strict=True):
        model = build(plan, store)
        kl_sum, nll_sum, count = 0.0, 0.0, 0
        for conv in conversations:
            ids, response = render_conversation(tok, conv["messages"])
            x = torch.tensor([ids])
            t = torch.log_softmax(teacher(x).logits[0].double(), -1)
            q = torch.log_softmax(model(x).logits[0].double(), -1)
            for pos in range(len(ids) - 1):
                if response[pos + 1]:
                    kl_sum += float((t[pos].exp() * (t[pos] - q[pos])).sum())
                    nll_sum -= float(q[pos, ids[pos + 1]])
                    count += 1
        assert score.kl is not None and math.isclose(score.kl, kl_sum / count, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(score.nll, nll_sum / count, rel_tol=1e-4)
    assert scores[-1].kl == pytest.approx(0.0, abs=1e-6) and scores[0].kl is not None and scores[0].kl > 1e-3


def test_general_text_is_prose_available_offline() -> None:
    texts = general_texts()
    assert len(texts) > 100 and all(len(t) >= 200 for t in texts)
    assert any("Light" in t for t in texts[:20])
    blocks = general_blocks(tiny_tokenizer(), seq_len=64, max_blocks=3)
    assert blocks.shape == (3, 64)


# --- the search by a metric and the teacher at the top --------------------------------------------


@torch.no_grad()
def test_search_by_chat_kl_and_the_teacher_is_the_largest_size(
    pair: tuple[PreTrainedModel, PreTrainedModel, StudentSpec], store: LayerStore, conversations: list[dict[str, Any]]
) -> None:
    tok = tiny_tokenizer()
    chat = chat_set(tok, conversations)
    calib = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(5))
    result = search(store, calib, min_layers=2, k_best=10**6, select="chat_kl", chat=chat, progress=False)
    assert select_for_metric("chat_kl") == "chat_kl" and select_for_metric("ppl") == "nll"
    assert all(c.chat_kl is not None for c in result.candidates)
    # every candidate's chat KL is the scorer's, and the chosen plan is the lowest at its count
    some = result.candidates[::7]
    direct = chat_scores(store, [c.plan for c in some], chat)
    assert [c.chat_kl for c in some] == pytest.approx([s.kl for s in direct], rel=1e-6, abs=1e-9)
    for plan in result.plans:
        lowest = min(c.chat_kl for c in result.by_layers()[plan.num_layers] if c.chat_kl is not None)
        assert plan.meta["calib_chat_kl"] == lowest

    family = family_from_search("tiny", store, result)
    assert family.info["metric"] == "chat_kl"
    largest = family.largest
    assert largest.name == f"l{LAYERS}" and not largest.dominated
    assert largest.plan.key == teacher_plan(LAYERS).key and largest.plan.origin == "teacher"
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(6))
    assert torch.equal(build(largest.plan, store)(ids).logits, pair[0](ids).logits)
    assert not any(s.name.startswith("m") for s in family.sizes)  # nothing beats the teacher's chat KL of 0


def test_a_plan_that_beats_the_teacher_is_kept_under_another_name(store: LayerStore) -> None:
    spec = store.spec
    assert spec is not None
    teacher = replace(teacher_plan(LAYERS), origin="shortgpt")  # how the search scores the teacher
    mixed = plan_for_patched(spec, [0, 1, 3], origin="search")  # s2 in place of teacher layer 4: 6 layers
    small = plan_for_patched(spec, [], origin="search")
    assert mixed.num_layers == LAYERS and mixed.key != teacher.key
    candidates = [
        Candidate(plan=small, kl=0.5, nll=3.0, proxy=None, rank=None),
        Candidate(plan=teacher, kl=0.0, nll=2.0, proxy=None, rank=None),
        Candidate(plan=mixed, kl=0.1, nll=1.9, proxy=None, rank=None),  # lower calibration NLL than the teacher
    ]
    meta = [{"calib_kl": c.kl, "calib_nll": c.nll} for c in (candidates[0], candidates[2])]
    result = SearchResult(
        plans=[replace(small, meta=meta[0]), replace(mixed, meta=meta[1])],
        candidates=candidates,
        costs=EdgeCosts(skip=[0.0] * LAYERS, student=[0.0] * spec.num_student_layers),
        select="nll",
    )
    family = family_from_search("tiny", store, result)
    assert [s.name for s in family.sizes] == [f"l{small.num_layers}", f"m{LAYERS}", f"l{LAYERS}"]
    by_name = {s.name: s for s in family.sizes}
    assert by_name[f"m{LAYERS}"].plan.key == mixed.key and not by_name[f"m{LAYERS}"].dominated
    assert by_name[f"l{LAYERS}"].plan.key == teacher.key and by_name[f"l{LAYERS}"].plan.meta["calib_nll"] == 2.0
    assert not by_name[f"l{LAYERS}"].dominated  # worse than m6 on calibration, and still served
    assert family.largest.name == f"l{LAYERS}" and family.resolve("1.0").name == f"l{LAYERS}"
    assert all(re.fullmatch(r"[a-z]\d+", s.name) for s in family.sizes)  # the size names deploy files accept
    # a tie with the teacher keeps no second plan
    tie = [*candidates[:2], replace(candidates[2], nll=2.0)]
    family = family_from_search("tiny", store, replace(result, candidates=tie))
    assert [s.name for s in family.sizes] == [f"l{small.num_layers}", f"l{LAYERS}"]


# --- the report ----------------------------------------------------------------------------------


def test_eval_report_has_the_chat_columns(
    store: LayerStore, conversations: list[dict[str, Any]], tmp_path: Path
) -> None:
    spec = store.spec
    assert spec is not None
    plans = [plan_for_patched(spec, [], origin="search"), plan_for_patched(spec, [1], origin="search")]
    family = Family.from_plans("tiny", store, [*plans, teacher_plan(LAYERS)], order="search")
    family.sizes = [replace(s, name=f"l{s.num_layers}") for s in family.sizes]
    summary = evaluate_cli(
        family, tmp_path, max_tokens=128, seq_len=32, calib_blocks=2, conversations=conversations, questions=6
    )
    md = (tmp_path / "curve.md").read_text()
    assert "What a chat user feels" in md and "chat KL" in md and "general ppl" in md
    assert "| teacher | 6 |" in md and "0.000" in md.split("| teacher | 6 |")[1].split("\n")[0]
    assert f"| l{plans[0].num_layers} |" in md and "/6 |" in md
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    assert "chat KL" in summary and "shortgpt-" in summary
    assert not family.sizes[-1].dominated and "| l6 (dominated) |" not in md  # the teacher is always served


def test_eval_keeps_the_dominance_of_a_family_chosen_by_chat_kl(store: LayerStore) -> None:
    spec = store.spec
    assert spec is not None
    plans = [plan_for_patched(spec, []), plan_for_patched(spec, [1]), teacher_plan(LAYERS)]
    family = Family.from_plans("tiny", store, plans, order="search")
    family.info["metric"] = "chat_kl"
    family.sizes = [replace(s, dominated=d) for s, d in zip(family.sizes, [False, True, False], strict=True)]
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(8))
    evaluate_family(family, ids, ids, orders=(), batch_size=2, progress=False)
    assert [s.dominated for s in family.sizes] == [False, True, False]
    assert all(s.perplexity is not None for s in family.sizes)


def test_evaluate_chat_rows_and_reuse(store: LayerStore, conversations: list[dict[str, Any]]) -> None:
    """Sizes, ShortGPT at their layer counts (the teacher at the teacher's) and the teacher, each
    scored once; known Python-docs perplexities are not recomputed."""
    spec = store.spec
    assert spec is not None
    sizes: list[tuple[str, SizePlan, bool]] = [
        ("l4", plan_for_patched(spec, []), False),
        ("l6", teacher_plan(LAYERS), False),
    ]
    blocks = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(7))
    known = {teacher_plan(LAYERS).key: 123.0}
    r = evaluate_chat(
        store,
        sizes,
        influence=[0.1 * (i + 1) for i in range(LAYERS)],
        chat=chat_set(tiny_tokenizer(), conversations),
        questions=[QAItem("What is 2 + 2?", ("4",))],
        pydoc_blocks=blocks,
        known_pydoc=known,
        max_new_tokens=3,
        progress=False,
    )
    assert [(p.name, p.kind) for p in r.points] == [
        ("l4", "size"),
        ("l6", "size"),
        ("shortgpt-4", "shortgpt"),
        ("teacher", "teacher"),
    ]
    by = {p.name: p for p in r.points}
    assert by["teacher"].pydoc_ppl == 123.0 and by["l6"].pydoc_ppl == 123.0  # known: not run again
    assert by["teacher"].chat_kl == pytest.approx(0.0, abs=1e-6) and by["l6"].chat_kl == by["teacher"].chat_kl
    assert by["shortgpt-4"].general_ppl is None and by["l4"].qa_correct in (0, 1)
    assert r.shortgpt_at(6) is by["teacher"] and r.shortgpt_at(4) is by["shortgpt-4"]
    assert r.replies["l6"] == r.replies["teacher"]
    # l6 is the teacher: the chat KL chain ends there, not at the teacher again (0 -> 0 is no rise)
    falls = next(v for v in r.verdicts() if "Chat KL falls strictly" in v)
    assert by["l4"].chat_kl is not None and by["l4"].chat_kl > 0
    assert "falls strictly from the smallest size to the teacher: yes" in falls, falls
