"""What structured outputs cost on the in-process engine: tokens/s with a json_schema constraint
against the same requests without one, measured in ONE run.

    .venv/bin/python bench/grammar_bench.py [--demo] [--requests 16] [--new-tokens 64] [--rounds 3]

``--requests`` chat prompts (a request for a JSON record about one stdlib docs topic) run at once on
the largest size, greedy. First every request runs under the schema below (the grammar compiled by
a warm-up, as a served schema is after its first request) and its token count is kept; then the same
requests run free with ``max_tokens`` set to those counts and EOS ignored, so both runs generate the
same tokens with the same batch over time and only the grammar differs: its mask before each choice
and its matcher after. Tokens/s = generated tokens / wall time of the burst (prefill included); the
median over ``--rounds`` rounds, alternating the two. Target: the grammar costs < 10%.

Family: a tiny random family (default; its answers are not meaningful JSON, which does not change
the cost of masking), or with ``--demo`` the demo family (the demo teacher with a stand-in student
when the family is not built; see bench/serve_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pydoc_data.topics
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests: the tiny family

import torch

from boomerang_core.family import Family
from server.engines.base import GenerationRequest, SamplingParams, StructuredSpec
from server.engines.local import sampling
from server.engines.local.engine import LocalEngine
from server.engines.local.grammar import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "summary": {"type": "string"},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "pages": {"type": "integer", "minimum": 1},
    },
    "required": ["topic", "summary", "keywords", "difficulty", "pages"],
    "additionalProperties": False,
}


def tiny_family(workdir: Path) -> Family:
    from boomerang_core.store import LayerStore
    from tests.tiny import write_pair

    teacher, student = write_pair(workdir, "llama", layers=8)
    return Family.from_store("tiny", LayerStore.load(teacher, student))


def demo_family() -> Family:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_bench import load_family

    family, label = load_family()
    print(f"family: {label}")
    return family


def chat_prompts(family: Family, count: int) -> list[tuple[int, ...]]:
    tok = family.store.tokenizer
    assert tok is not None
    topics = list(pydoc_data.topics.topics.items())[:count]
    prompts = []
    for name, text in topics:
        ask = f"Describe the topic '{name}' as a JSON record.\n\n{text[:300]}"
        text = tok.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True, tokenize=False)
        prompts.append(tuple(tok(text, add_special_tokens=False)["input_ids"]))
    return prompts


async def burst(
    engine: LocalEngine, size: str, prompts: list[tuple[int, ...]], params: list[SamplingParams]
) -> tuple[float, list[int]]:
    """All requests at once; the wall seconds and each request's generated tokens."""
    t0 = time.perf_counter()

    async def one(i: int) -> int:
        n = 0
        async for event in engine.generate(GenerationRequest(f"g{i}", size, prompts[i], params[i])):
            n += len(event.token_ids)
        return n

    counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return time.perf_counter() - t0, list(counts)


class GrammarClock:
    """Seconds the worker spends in the grammar (masking rows, advancing matchers): a figure that
    does not move with the machine's other load, unlike the wall-time ratio."""

    def __init__(self) -> None:
        self.seconds = 0.0
        mask_rows, accept = sampling.mask_rows, Constraint.accept

        def timed_mask(*args: Any) -> None:
            t0 = time.perf_counter()
            mask_rows(*args)
            self.seconds += time.perf_counter() - t0

        def timed_accept(constraint: Constraint, token_id: int) -> None:
            t0 = time.perf_counter()
            accept(constraint, token_id)
            self.seconds += time.perf_counter() - t0

        sampling.mask_rows = timed_mask  # type: ignore[assignment]
        Constraint.accept = timed_accept  # type: ignore[method-assign]


async def measure(family: Family, requests: int, new_tokens: int, rounds: int) -> None:
    size = family.sizes[-1].name
    prompts = chat_prompts(family, requests)
    spec = StructuredSpec("json", json.dumps(SCHEMA), param="response_format")
    constrained = [SamplingParams(max_tokens=new_tokens, temperature=0.0, structured=spec)] * requests
    engine = LocalEngine(family, sizes=[size], max_batch_size=requests)
    await engine.start()
    try:
        await burst(engine, size, prompts[:1], constrained[:1])  # warm-up: compiles the schema
        _, counts = await burst(engine, size, prompts, constrained)
        free = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
        await burst(engine, size, prompts[:1], free[:1])
        with_grammar, without, grammar_share = [], [], []
        clock = GrammarClock()
        for _ in range(rounds):
            clock.seconds = 0.0
            wall, got = await burst(engine, size, prompts, constrained)
            assert got == counts, "greedy constrained runs differ"
            with_grammar.append(sum(got) / wall)
            grammar_share.append(clock.seconds / wall)
            wall, got = await burst(engine, size, prompts, free)
            assert got == counts, "the free run did not generate the same tokens"
            without.append(sum(got) / wall)
    finally:
        await engine.stop()
    a, b = statistics.median(with_grammar), statistics.median(without)
    print(f"size {size}: {requests} requests, {sum(counts)} tokens per burst ({min(counts)}..{max(counts)} per "
          f"request, max_tokens {new_tokens}), {rounds} rounds, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"without grammar: {b:8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in without)})")
    print(f"json_schema:     {a:8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in with_grammar)})")
    print(f"ratio with/without: {a / b:.3f}  (grammar cost {100 * (1 - a / b):.1f}%; target < 10%)")
    share = statistics.median(grammar_share)
    print(f"time in the grammar (masks + matchers) during the constrained bursts: {100 * share:.1f}% of wall time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the demo family instead of a tiny random one")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        family = demo_family() if a.demo else tiny_family(Path(tmp))
        asyncio.run(measure(family, a.requests, a.new_tokens, a.rounds))


if __name__ == "__main__":
    main()
