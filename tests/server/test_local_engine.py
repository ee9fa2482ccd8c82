"""LocalEngine against the same ``build(plan)`` models run by plain transformers, on tiny families."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from boomerang_core.assemble import build
from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from server.engines.base import EngineError, GenerationRequest, QueueFull, SamplingParams, TokenEvent
from server.engines.local.detokenize import IncrementalDetokenizer, StopStrings
from server.engines.local.engine import LocalEngine
from tests.tiny import tiny_tokenizer, write_pair

PROMPTS = [
    "def foo(x):",
    "The quick brown fox jumps over the lazy dog and",
    "Hello",
    "class Point:\n    x: int",
    "import os, sys; print(sys.argv[1:])",
]
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine pay for their barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    t_dir, s_dir = write_pair(tmp_path_factory.mktemp("llama"), "llama")
    return Family.from_store("tiny", LayerStore.load(t_dir, s_dir))


def ids_of(family: Family, text: str) -> tuple[int, ...]:
    assert family.store.tokenizer is not None
    return tuple(family.store.tokenizer(text)["input_ids"])


def with_engine(family: Family, body: Callable[[LocalEngine], Awaitable[Any]], **kwargs: Any) -> Any:
    async def main() -> Any:
        engine = LocalEngine(family, **kwargs)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [ev async for ev in stream]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


_REFERENCE: dict[tuple[int, str, tuple[int, ...]], list[int]] = {}
REFERENCE_TOKENS = 12


def reference_greedy(family: Family, size: str, prompt: tuple[int, ...], n: int) -> list[int]:
    """``generate(do_sample=False)`` on the size's own ``build(plan)`` model, EOS suppressed; a greedy
    run of 12 tokens is computed once and its prefixes reused."""
    key = (id(family.store), size, prompt)
    if key not in _REFERENCE or len(_REFERENCE[key]) < n:
        model = build(family.by_name(size).plan, family.store)
        m = max(n, REFERENCE_TOKENS)
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=m, min_new_tokens=m)
        _REFERENCE[key] = out[0, len(prompt) :].tolist()
    return _REFERENCE[key][:n]


def request(rid: str, size: str, prompt: tuple[int, ...], **sampling: Any) -> GenerationRequest:
    return GenerationRequest(rid, size, prompt, SamplingParams(**sampling))


@pytest.mark.parametrize(("prefill_tokens", "sharing"), [(512, "any_depth"), (5, "same_depth"), (512, "off")])
def test_greedy_equals_generate_for_every_size_batched_together(
    family: Family, prefill_tokens: int, sharing: str
) -> None:
    jobs = [(s.name, ids_of(family, PROMPTS[i % len(PROMPTS)])) for i, s in enumerate(family.sizes)]
    jobs += [(s.name, ids_of(family, PROMPTS[(i + 2) % len(PROMPTS)])) for i, s in enumerate(family.sizes)]

    async def body(engine: LocalEngine) -> list[list[TokenEvent]]:
        streams = [
            engine.generate(request(f"r{i}", size, p, max_tokens=10, temperature=0, ignore_eos=True))
            for i, (size, p) in enumerate(jobs)
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = with_engine(family, body, prefill_tokens=prefill_tokens, layer_sharing=sharing)
    for (size, prompt), events in zip(jobs, results, strict=True):
        assert tokens(events) == reference_greedy(family, size, prompt, 10), size
        assert events[-1].finish_reason == "length"
        assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (len(prompt), 10)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen3", "qwen2", "mistral"])
def test_greedy_equals_generate_on_other_architectures(tmp_path: Path, arch: str) -> None:
    fam = Family.from_store(arch, LayerStore.load(*write_pair(tmp_path, arch)))
    sizes = [fam.sizes[0].name, fam.sizes[-1].name]

    async def body(engine: LocalEngine) -> list[list[TokenEvent]]:
        streams = [
            engine.generate(request(f"{s}{j}", s, ids_of(fam, PROMPTS[j]), **GREEDY, max_tokens=8))
            for s in sizes
            for j in range(2)
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = iter(with_engine(fam, body))
    for s in sizes:
        for j in range(2):
            assert tokens(next(results)) == reference_greedy(fam, s, ids_of(fam, PROMPTS[j]), 8), (arch, s)


def test_logprobs_match_the_models_log_softmax(family: Family) -> None:
    jobs = [(s.name, ids_of(family, PROMPTS[i % len(PROMPTS)])) for i, s in enumerate(family.sizes)]

    async def body(engine: LocalEngine) -> list[list[TokenEvent]]:
        streams = [
            engine.generate(
                request(f"r{i}", size, p, max_tokens=12, temperature=1.0, seed=i, logprobs=3, prompt_logprobs=2)
            )
            for i, (size, p) in enumerate(jobs)
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    for (size, prompt), events in zip(jobs, with_engine(family, body), strict=True):
        out = tokens(events)
        model = build(family.by_name(size).plan, family.store)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt + tuple(out)])).logits[0].float(), -1)
        got = [lp for ev in events for lp in ev.logprobs]
        assert [lp.token_id for lp in got] == out
        for j, lp in enumerate(got):
            row = ref[len(prompt) - 1 + j]
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
            assert [t for t, _, _ in lp.top] == row.topk(3).indices.tolist()
        prompt_lps = events[0].prompt_logprobs
        assert prompt_lps is not None and prompt_lps[0] is None and len(prompt_lps) == len(prompt)
        for j, plp in enumerate(prompt_lps[1:], start=1):
            assert plp is not None and plp.token_id == prompt[j]
            assert plp.logprob == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
            assert len(plp.top) == 2


def test_seeded_sampling_is_reproducible_and_batch_independent(family: Family) -> None:
    size = family.sizes[1].name
    prompt = ids_of(family, PROMPTS[0])
    params = dict(max_tokens=16, temperature=1.2, top_p=0.9, top_k=50, seed=1234)

    async def alone(engine: LocalEngine) -> list[int]:
        return tokens(await collect(engine.generate(request("a", size, prompt, **params))))

    async def crowded(engine: LocalEngine) -> list[int]:
        others = [
            engine.generate(request(f"o{i}", s.name, ids_of(family, PROMPTS[i % 5]), max_tokens=20, temperature=1.0))
            for i, s in enumerate(family.sizes * 2)
        ]
        mine = engine.generate(request("a", size, prompt, **params))
        results = await asyncio.gather(collect(mine), *(collect(o) for o in others))
        return tokens(results[0])

    first, second, busy = with_engine(family, alone), with_engine(family, alone), with_engine(family, crowded)
    assert first == second == busy
    other_seed = with_engine(
        family, lambda e: collect(e.generate(request("b", size, prompt, **{**params, "seed": 99})))
    )
    assert tokens(other_seed) != first


def test_stop_strings_and_stop_token_ids(family: Family) -> None:
    tok = family.store.tokenizer
    assert tok is not None
    size = family.sizes[0].name
    prompt = ids_of(family, PROMPTS[3])

    def run(**sampling: Any) -> list[TokenEvent]:
        return with_engine(family, lambda e: collect(e.generate(request("s", size, prompt, **sampling))))

    full = run(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    text = "".join(ev.text for ev in full)
    assert text == tok.decode(tokens(full), skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = run(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True, stop=("\x00never", stop))
    assert "".join(ev.text for ev in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    third = tokens(full)[2]
    by_id = run(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True, stop_token_ids=(third,))
    assert tokens(by_id)[-1] == third and by_id[-1].finish_reason == "stop"
    assert len(tokens(by_id)) == tokens(full).index(third) + 1


def test_penalties_follow_openai_semantics(family: Family) -> None:
    size = family.sizes[2].name
    prompt = ids_of(family, PROMPTS[1])
    model = build(family.by_name(size).plan, family.store)
    for presence, frequency in [(0.0, 2.0), (3.0, 0.5)]:
        seq, counts = list(prompt), torch.zeros(family.store.configs["teacher"].vocab_size)
        for _ in range(10):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].float()
            logits -= frequency * counts + presence * (counts > 0).float()
            nxt = int(logits.argmax())
            counts[nxt] += 1
            seq.append(nxt)
        expected = seq[len(prompt) :]
        got = with_engine(
            family,
            lambda e, p=presence, f=frequency: collect(
                e.generate(
                    request(
                        "p",
                        size,
                        prompt,
                        max_tokens=10,
                        temperature=0,
                        ignore_eos=True,
                        presence_penalty=p,
                        frequency_penalty=f,
                    )
                )
            ),
        )
        assert tokens(got) == expected
    plain = reference_greedy(family, size, prompt, 10)
    assert expected != plain  # the penalties changed the output


def test_cancel_and_abort_free_the_slot_within_a_step(family: Family) -> None:
    size = family.sizes[0].name
    prompt = ids_of(family, PROMPTS[0])

    async def body(engine: LocalEngine) -> None:
        stream = engine.generate(request("c", size, prompt, max_tokens=400, temperature=0, ignore_eos=True))
        await stream.__anext__()
        assert engine.load(size).running == 1
        await stream.aclose()  # type: ignore[attr-defined]
        await wait_for(lambda: engine.load(size).running == 0)
        stream = engine.generate(request("d", size, prompt, max_tokens=400, temperature=0, ignore_eos=True))
        await stream.__anext__()
        await engine.abort("d")
        with pytest.raises(EngineError, match="aborted"):
            async for _ in stream:
                pass
        assert engine.load(size).running == 0

    with_engine(family, body)


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_queue_full_past_the_bound(family: Family) -> None:
    size = family.sizes[0].name
    prompt = ids_of(family, PROMPTS[0])

    async def body(engine: LocalEngine) -> int:
        streams = []
        with pytest.raises(QueueFull) as info:
            for i in range(4):
                streams.append(engine.generate(request(f"q{i}", size, prompt, max_tokens=300, ignore_eos=True)))
        assert info.value.retry_after_s > 0
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        return len(streams)

    admitted = with_engine(family, body, max_batch_size=1, max_queue=2)
    assert admitted in (2, 3)  # 1 running + 2 waiting, or 2 waiting if the first was not admitted yet


def test_many_concurrent_requests_get_exactly_their_own_tokens(family: Family) -> None:
    rng = random.Random(0)
    jobs = [(rng.choice(family.sizes).name, ids_of(family, rng.choice(PROMPTS)), rng.randint(1, 12)) for _ in range(40)]

    async def body(engine: LocalEngine) -> list[list[TokenEvent]]:
        async def one(i: int, size: str, prompt: tuple[int, ...], n: int) -> list[TokenEvent]:
            await asyncio.sleep(rng.random() * 0.05)  # arrive while others run
            return await collect(engine.generate(request(f"m{i}", size, prompt, **GREEDY, max_tokens=n)))

        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    results = with_engine(family, body, max_batch_size=12)
    tok = family.store.tokenizer
    assert tok is not None
    for (size, prompt, n), events in zip(jobs, results, strict=True):
        assert tokens(events) == reference_greedy(family, size, prompt, n)
        assert "".join(ev.text for ev in events) == tok.decode(tokens(events), skip_special_tokens=True)
        assert [ev.finish_reason for ev in events] == [None] * (n - 1) + ["length"]


def test_a_failing_step_fails_only_its_requests(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.engines.local.engine as local

    real = local.forward_step
    calls = {"n": 0}

    def flaky(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(local, "forward_step", flaky)
    size = family.sizes[0].name
    prompt = ids_of(family, PROMPTS[0])

    async def body(engine: LocalEngine) -> list[TokenEvent]:
        with pytest.raises(EngineError, match="engine step serving this request failed") as failed:
            await collect(engine.generate(request("x", size, prompt, max_tokens=4)))
        assert "injected" not in str(failed.value)  # the cause is logged, never sent to the client
        assert engine.healthy()
        events = await collect(engine.generate(request("y", size, prompt, max_tokens=4, temperature=0)))
        assert engine.load(size).prefill_tokens_per_s is not None
        return events

    assert tokens(with_engine(family, body)) == reference_greedy(family, size, prompt, 4)


def test_bad_requests_are_refused_at_admission(family: Family) -> None:
    async def body(engine: LocalEngine) -> None:
        with pytest.raises(EngineError, match="size"):
            engine.generate(request("b", "k99", (1, 2)))
        with pytest.raises(EngineError, match="empty"):
            engine.generate(request("b", family.sizes[0].name, ()))
        with pytest.raises(EngineError, match="out of range"):
            engine.generate(request("b", family.sizes[0].name, (10**6,)))

    with_engine(family, body)
    assert not LocalEngine(family).healthy()  # never started


def test_incremental_detokenizer_concatenates_to_the_full_decode() -> None:
    tok = tiny_tokenizer()
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tok)
        text = "".join(detok.push(t) for t in ids) + detok.flush()
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_hold_back_only_possible_starts() -> None:
    stops = StopStrings(["END", "xyz"])
    assert stops.push("abcE") == ("abc", False)
    assert stops.push("N") == ("", False)
    assert stops.push("Dmore") == ("", True)
    stops = StopStrings(["END"])
    assert stops.push("aEN") == ("a", False)
    assert stops.push("x") == ("ENx", False)
    assert stops.flush() == ""


def test_each_store_layer_runs_once_per_step_for_every_size(family: Family) -> None:
    from server.engines.local.packed import RowWork, SizeCache, SizeWork, _layer_steps

    engine = LocalEngine(family)
    assert engine.shares_layers_across_sizes
    parts = [s.parts for s in engine._sizes]
    works = [SizeWork(SizeCache(len(p.layers)), [1], [RowWork(0, 0, 1)], [], [0]) for p in parts]
    steps = _layer_steps(parts, works, engine._order, True)
    calls = [id(module) for module, _ in steps]
    assert len(calls) == len(set(calls)) == len({id(layer) for p in parts for layer in p.layers})
    assert sum(len(members) for _, members in steps) == sum(len(p.layers) for p in parts)
    for module, members in steps:
        assert all(parts[i].layers[depth] is module for i, depth in members)


def test_first_event_carries_the_time_spent_queued(family: Family) -> None:
    """With one running slot, the second request waits for the first to finish: its queue time is
    reported on its first event (for the queue-time metric) and on no later event."""
    prompt = ids_of(family, "def f(x):")

    async def body(engine: LocalEngine) -> tuple[list[TokenEvent], list[TokenEvent]]:
        first = collect(engine.generate(request("q1", "k0", prompt, max_tokens=6, temperature=0, ignore_eos=True)))
        second = collect(engine.generate(request("q2", "k0", prompt, max_tokens=2, temperature=0, ignore_eos=True)))
        return tuple(await asyncio.gather(first, second))  # type: ignore[return-value]

    a, b = with_engine(family, body, max_batch_size=1)
    assert a[0].queue_s is not None and b[0].queue_s is not None
    assert b[0].queue_s > a[0].queue_s >= 0
    assert all(ev.queue_s is None for ev in a[1:] + b[1:])


def test_engine_names_its_own_attention_and_leaves_sdpa_alone(family: Family) -> None:
    """The packed attention is registered under its own name and named only in the engine's layer
    configs: transformers' ``sdpa`` stays its own function, and the store's layers and every built
    size keep the attention they were loaded with, while the engine serves."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from server.engines.local.packed import ATTENTION

    async def started(engine: LocalEngine) -> LocalEngine:
        return engine

    engine = with_engine(family, started)
    assert AttentionInterface()["sdpa"] is sdpa_attention_forward
    engine_layers = {id(m) for s in engine._sizes for m in s.parts.layers}
    for size in engine._sizes:
        for layer in size.parts.layers:
            assert layer.self_attn.config._attn_implementation == ATTENTION
    store = family.store
    for layers in store.layers.values():
        for layer in layers:
            assert id(layer) not in engine_layers
            assert layer.self_attn.config._attn_implementation == "sdpa"
    built = build(family.sizes[len(family.sizes) // 2].plan, store)
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in store.adapter.get_layers(built))
