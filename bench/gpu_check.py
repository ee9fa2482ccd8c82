"""LocalEngine on an accelerator: tokens/s per size against the memory-bandwidth bound.

    python bench/gpu_check.py                       # CUDA, the demo architecture, random weights
    python bench/gpu_check.py --device cpu --tiny   # the same path, tiny, to know the script works

Builds a family with the demo teacher's architecture (SmolLM2-135M: Llama, hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings) and RANDOM weights (speed does
not depend on their values), a student pruned from it (``StudentSpec.from_pruning``) and every
last-k size. For a few sizes, a burst of ``--requests`` requests goes through LocalEngine alone;
then one burst spread over all sizes. A decode step must read every weight of the size once, so
``weight bytes / copy bandwidth`` is the fastest a step can be; the ratio says how close we are.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from boomerang_core.alignment import StudentSpec
from boomerang_core.distill import prune_student
from boomerang_core.family import Family
from boomerang_core.store import LayerStore
from server.engines.base import GenerationRequest, SamplingParams
from server.engines.local.engine import LocalEngine


def demo_config(tiny: bool) -> LlamaConfig:
    if tiny:
        dims = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512)  # fmt: skip
    else:
        dims = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152)  # fmt: skip
    return LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose every id decodes to a word: enough to stream text from random weights."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", pad_token="w0")


def random_family(tiny: bool, device: str, dtype: torch.dtype) -> Family:
    torch.manual_seed(0)
    config = demo_config(tiny)
    teacher: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    spec = StudentSpec.from_pruning(config.num_hidden_layers)
    student = prune_student(teacher, spec).requires_grad_(False).eval()
    with torch.no_grad():  # distinct student weights, as after distillation
        for p in student.model.layers.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    store = LayerStore.from_models(teacher, student, spec, word_tokenizer(config.vocab_size))
    return Family.from_store("demo-arch", store)


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted), best of 5."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def burst(engine: LocalEngine, sizes: list[str], requests: int, prompt: int, new: int) -> dict[str, float]:
    vocab = engine.vocab_size
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    firsts: list[float] = []

    async def one(i: int) -> int:
        ids = tuple(torch.randint(1, vocab, (prompt,), generator=gen).tolist())
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        n = 0
        async for ev in engine.generate(GenerationRequest(f"g{i}", sizes[i % len(sizes)], ids, params)):
            if n == 0:
                firsts.append(time.perf_counter())
            n += len(ev.token_ids)
        return n

    tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    end = time.perf_counter()
    decode_tokens = tokens - requests
    return {
        "tok_s": tokens / (end - t0),
        "decode_tok_s": decode_tokens / max(end - max(firsts), 1e-9),
        "step_s": (end - max(firsts)) / max(new - 1, 1),
    }


async def main_async(args: argparse.Namespace) -> None:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    family = random_family(args.tiny, args.device, dtype)
    bw = copy_bandwidth(args.device)
    print(f"device {args.device}, dtype {args.dtype}, copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{len(family.sizes)} sizes; {args.requests} requests per burst, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens")  # fmt: skip
    picks = sorted({0, len(family.sizes) // 2, len(family.sizes) - 1})
    engine = LocalEngine(family, max_batch_size=args.requests)
    await engine.start()
    try:
        await burst(engine, [family.sizes[0].name], 2, 8, 2)  # warm-up
        print(f"{'size':>6} {'layers':>6} {'weights MB':>10} {'tok/s':>8} {'decode tok/s':>12} {'step ms':>8} "
              f"{'bound ms':>8} {'bound/step':>10}")  # fmt: skip
        for i in picks:
            size = family.sizes[i]
            r = await burst(engine, [size.name], args.requests, args.prompt_tokens, args.new_tokens)
            bound = size.bytes / bw
            print(f"{size.name:>6} {size.num_layers:>6} {size.bytes / 1e6:>10.1f} {r['tok_s']:>8.1f} "
                  f"{r['decode_tok_s']:>12.1f} {r['step_s'] * 1e3:>8.2f} {bound * 1e3:>8.3f} "
                  f"{bound / r['step_s']:>10.3f}")  # fmt: skip
        names = [s.name for s in family.sizes]
        r = await burst(engine, names, args.requests, args.prompt_tokens, args.new_tokens)
        held = family.store.resident_bytes()
        bound = held / bw
        print(f"{'mixed':>6} {'all':>6} {held / 1e6:>10.1f} {r['tok_s']:>8.1f} {r['decode_tok_s']:>12.1f} "
              f"{r['step_s'] * 1e3:>8.2f} {bound * 1e3:>8.3f} {bound / r['step_s']:>10.3f}")  # fmt: skip
        print("bound = weight bytes read per decode step / copy bandwidth (mixed: every resident weight once)")
    finally:
        await engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --tiny to check the script")
    with torch.inference_mode():
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
