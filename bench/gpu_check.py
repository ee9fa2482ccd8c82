"""What a GPU can check without vLLM: LocalEngine's speed per size, and the shared store mapped by
a second process through CUDA IPC.

    python bench/gpu_check.py                       # CUDA, the demo architecture, random weights
    python bench/gpu_check.py --device cpu --tiny   # the same paths, tiny, to know the script works
    python bench/gpu_check.py --only ipc            # one part: speed or ipc

**speed.** Builds a family with the demo teacher's architecture (SmolLM2-135M: Llama, hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings) and RANDOM weights (speed does
not depend on their values), a student pruned from it (``StudentSpec.from_pruning``) and every
last-k size. For a few sizes, a burst of ``--requests`` requests goes through LocalEngine alone;
then one burst spread over all sizes. A decode step must read every weight of the size once, so
``weight bytes / copy bandwidth`` is the fastest a step can be; the ratio says how close we are.

**ipc.** The store is moved into one shared allocation (``shared_store.share_store``: on CUDA one
device allocation whose CUDA IPC handle goes into the manifest, as vLLM worker processes get it; on
CPU the shared-memory file). A second Python process maps it (``map_shared``), builds the smallest
and the largest size over the mapped tensors (``build_mapped``: no copy, no vLLM) and runs them
greedily. It reports the device memory in use (``cudaMemGetInfo``, every process) before the
mapping, after it and after the runs; on CPU, its own private and shared resident bytes
(``/proc/self/smaps_rollup``). Passes when both sizes give the owner's tokens (the largest logit
difference is printed) and the mapping adds under 5% of the store's bytes: to the device's memory
in use (CUDA), or to the child's private bytes once the runs have read every page (CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, from a plain checkout

from boomerang_core.alignment import StudentSpec
from boomerang_core.assemble import build, size_config
from boomerang_core.distill import prune_student
from boomerang_core.family import Family
from boomerang_core.plan import SizePlan
from boomerang_core.shared_store import build_mapped, map_shared, share_store
from boomerang_core.store import LayerStore
from server.engines.base import GenerationRequest, SamplingParams
from server.engines.local.engine import LocalEngine

IPC_MAX_ADDED = 0.05  # the mapping may add at most this share of the store's bytes
CUDA_GRANULE = 2 << 20  # bytes; CUDA reserves device memory in 2 MiB pages


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


async def speed(args: argparse.Namespace, family: Family) -> None:
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


# --- ipc: a second process maps the store ----------------------------------------------------------


def greedy(model: PreTrainedModel, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """``new`` greedy tokens after ``prompt`` (full recompute per token: no cache to differ) and
    the logits of the prompt's last position, on the model's device."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    first = model(ids).logits[0, -1].float().cpu()
    for _ in range(new):
        step = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, step.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), first


def mapping_pages(path: str) -> dict[str, int]:
    """Resident bytes of this process's mappings of file ``path`` (``/proc/self/smaps``): private
    (a copy of this process's own) and shared (the very pages other processes map)."""
    out = {"private": 0, "shared": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line: range perms offset dev inode [path]
            inside = len(head) >= 6 and head[5] == path
        elif inside and head[0] in ("Private_Clean:", "Private_Dirty:", "Shared_Clean:", "Shared_Dirty:"):
            out["private" if head[0].startswith("Private") else "shared"] += int(head[1]) * 1024
    return out


def memory(device: str, data: str | None) -> dict[str, int]:
    """Device bytes in use by every process (CUDA), or this process's resident bytes of the store
    file (CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"used": total - free}
    assert data is not None, "a CPU store is shared through a file"
    return mapping_pages(data)


def ipc_child(job_path: Path) -> None:
    """The second process: map the owner's store, build each size over the mapping, run it."""
    job = json.loads(job_path.read_text())
    device = job["device"]
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context, before the first reading
    before = memory(device, job["data"])
    index = torch.device(device).index if device.startswith("cuda") else None
    mapped = map_shared(job["manifest"], index)
    after_map = memory(device, job["data"])
    out: dict[str, Any] = {"before": before, "after_map": after_map, "sizes": {}}
    for size in job["sizes"]:
        config = AutoConfig.for_model(**size["config"])
        model = build_mapped(mapped, SizePlan.from_dict(size["plan"]), config)
        tokens, first = greedy(model, job["prompt"], job["new"])
        out["sizes"][size["name"]] = {"tokens": tokens, "logits": first.tolist()}
    out["after_run"] = memory(device, job["data"])
    Path(job["out"]).write_text(json.dumps(out))


def ipc(args: argparse.Namespace, family: Family) -> bool:
    """Share the store, run the second process, compare; prints a table, returns whether it passed."""
    store = family.store
    sizes = [family.sizes[0], family.sizes[-1]]
    gen = torch.Generator().manual_seed(2)
    vocab = store.configs["teacher"].vocab_size
    prompt = torch.randint(1, vocab, (args.prompt_tokens,), generator=gen).tolist()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        shared = share_store(store, tmp)  # on CUDA one device allocation, its IPC handle in the manifest
        own = {s.name: greedy(build(s.plan, store), prompt, args.ipc_tokens) for s in sizes}
        job = Path(tmp) / "job.json"
        result = Path(tmp) / "child.json"
        job.write_text(json.dumps({
            "manifest": str(shared.manifest), "data": str(shared.data) if shared.data else None,
            "device": args.device, "prompt": prompt, "new": args.ipc_tokens,
            "out": str(result),
            "sizes": [{"name": s.name, "plan": s.plan.to_dict(), "config": size_config(store, s.plan).to_dict()}
                      for s in sizes],
        }))  # fmt: skip
        subprocess.run([sys.executable, __file__, "--ipc-child", str(job)], check=True, timeout=600)
        child = json.loads(result.read_text())
    kind = "device bytes in use, every process" if args.device.startswith("cuda") else "child's pages of the file"
    print(f"store shared: {shared.nbytes / 1e6:.1f} MB on {shared.device}; {kind}:")
    for key in child["before"]:
        readings = [child[at][key] / 1e6 for at in ("before", "after_map", "after_run")]
        print(f"  {key:>8}: before mapping {readings[0]:.1f} MB, after {readings[1]:.1f}, "
              f"after the runs {readings[2]:.1f}")  # fmt: skip
    if args.device.startswith("cuda"):  # mapping the owner's allocation must not allocate it again
        added = child["after_map"]["used"] - child["before"]["used"]
        ok = added <= IPC_MAX_ADDED * shared.nbytes + CUDA_GRANULE
    else:  # pages map lazily: after the runs have read them, every one must be shared, none private
        added = child["after_run"]["private"]
        ok = added <= IPC_MAX_ADDED * shared.nbytes and child["after_run"]["shared"] > 0
    share = added / shared.nbytes
    print(f"  the mapping added {added / 1e6:.1f} MB = {share:.1%} of the store (at most {IPC_MAX_ADDED:.0%})")
    for s in sizes:
        tokens, first = own[s.name]
        theirs = child["sizes"][s.name]
        same = theirs["tokens"] == tokens
        diff = float((torch.tensor(theirs["logits"]) - first).abs().max())
        ok &= same
        print(f"  {s.name:>6} ({s.num_layers} layers): {len(tokens)} greedy tokens {'equal' if same else 'DIFFER'}, "
              f"largest logit difference {diff:.3g}")  # fmt: skip
    print(f"ipc: {'PASS' if ok else 'FAIL'}")
    return ok


async def main_async(args: argparse.Namespace) -> bool:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    family = random_family(args.tiny, args.device, dtype)
    if args.only in (None, "speed"):
        await speed(args, family)
    return args.only == "speed" or ipc(args, family)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", choices=["speed", "ipc"], default=None)
    ap.add_argument("--ipc-tokens", type=int, default=16, help="greedy tokens per size in the ipc part")
    ap.add_argument("--ipc-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.ipc_child is not None:
        with torch.inference_mode():
            ipc_child(args.ipc_child)
        return
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --tiny to check the script")
    with torch.inference_mode():
        if not asyncio.run(main_async(args)):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
