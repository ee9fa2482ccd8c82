"""The in-process engine: every size of a family served from ONE LayerStore by one worker thread.

One thread owns all model work. The event loop only enqueues requests and aborts and reads events
from per-request asyncio queues, filled through ``loop.call_soon_threadsafe``; it never waits on
the model. Each worker step packs the next token of every decoding request and a chunk of every
prefilling prompt, of every size, into one forward (:mod:`server.engines.local.packed`), so a new
request joins the running batch at the next step and sizes are served side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from boomerang_core.assemble import bound_layers, layers_config
from boomerang_core.family import Family
from boomerang_core.plan import SizePlan
from boomerang_core.store import LayerStore
from server.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    QueueFull,
    RequestRejected,
    SizeLoad,
    TokenEvent,
    TokenLogprob,
)
from server.engines.local.detokenize import IncrementalDetokenizer, StopStrings
from server.engines.local.grammar import Constraint, GrammarError, Grammars
from server.engines.local.packed import (
    ATTENTION,
    RowWork,
    SizeCache,
    SizeParts,
    SizeWork,
    forward_step,
    layer_order,
    register_attention,
)
from server.engines.local.request import ActiveRequest
from server.engines.local.sampling import RequestSampler, sample
from server.engines.local.stats import LoadEstimates

log = logging.getLogger(__name__)
Owners = list[tuple[ActiveRequest, int, int]]  # per size in a step: (request, its first logit row, logit rows)


@dataclass(eq=False)
class _Size:
    name: str
    parts: SizeParts
    params: int
    cache: SizeCache
    rows: list[ActiveRequest] = field(default_factory=list)


def size_parts(store: LayerStore, plans: Sequence[SizePlan]) -> list[SizeParts]:
    """Each plan's parts taken from the store: its embeddings, final norm, head and rotary embedding,
    and at each depth the engine's container for that store layer, bound to the store's weights with
    :data:`~server.engines.local.packed.ATTENTION` as its attention. There is one container per store
    layer, whichever sizes and depths hold it, so a shared layer is one module that a step runs once."""
    if store.rotary is None:
        raise EngineError(f"{store.adapter.name} has no rotary embedding module; LocalEngine needs one")
    register_attention()
    refs = list(dict.fromkeys(r for plan in plans for r in plan.layers))
    bound = dict(zip(refs, bound_layers(store, refs, layers_config(store, refs, ATTENTION)), strict=True))
    return [
        SizeParts(
            embed=store.embeds[plan.embed],
            layers=tuple(bound[r] for r in plan.layers),
            norm=store.norms[plan.norm],
            head=store.heads[plan.head],
            rotary=store.rotary,
        )
        for plan in plans
    ]


class LocalEngine(Engine):
    """Continuous batching over every size of ``family`` on the store's device.

    ``max_batch_size`` bounds the requests running at once over ALL sizes (they share each step);
    ``max_queue`` bounds those waiting to start, past which :meth:`generate` raises :class:`QueueFull`;
    ``prefill_tokens`` bounds the prompt tokens one step computes (longer prompts are chunked), so a
    long prompt delays the running requests' next token by one bounded step, not by its whole prefill.
    ``layer_sharing`` says when a layer held by several sizes runs once per step for all of them:
    ``any_depth`` (default), ``same_depth``, or ``off`` (each size separately; for measurement).
    """

    def __init__(
        self,
        family: Family,
        *,
        sizes: Sequence[str] | None = None,
        max_batch_size: int = 16,
        max_queue: int = 256,
        prefill_tokens: int = 512,
        layer_sharing: str = "any_depth",
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ValueError("max_batch_size and prefill_tokens must be >= 1 and max_queue >= 0")
        if layer_sharing not in ("any_depth", "same_depth", "off"):
            raise ValueError(f"layer_sharing must be any_depth, same_depth or off, not {layer_sharing!r}")
        store = family.store
        if store.tokenizer is None:
            raise EngineError(f"family '{family.name}' has no tokenizer")
        self.family = family
        self.tokenizer = store.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        chosen = [family.by_name(n) for n in sizes] if sizes is not None else list(family.sizes)
        self._sizes = [
            _Size(fs.name, parts, fs.params, SizeCache(len(parts.layers)))
            for fs, parts in zip(chosen, size_parts(store, [fs.plan for fs in chosen]), strict=True)
        ]
        self._by_name = {s.name: i for i, s in enumerate(self._sizes)}
        self._share = layer_sharing != "off"
        self._order = layer_order([s.parts.layers for s in self._sizes]) if layer_sharing == "any_depth" else None
        config = store.configs["teacher"]
        self.max_context = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.vocab_size = int(config.vocab_size)
        eos: set[int] = set()
        for ids in (getattr(store.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(ids, int):
                eos.add(ids)
            elif ids is not None:
                eos.update(int(t) for t in ids)
        self.eos_ids = frozenset(eos)
        self._token_text: dict[int, str] = {}
        self._grammars: Grammars | None = None  # built by the first structured request
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: deque[ActiveRequest] = deque()
        self._num_waiting = 0
        self._waiting_by_size = [0] * len(self._sizes)
        self._by_id: dict[str, ActiveRequest] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[ActiveRequest, TokenEvent | BaseException]]] = {}
        self.stats = LoadEstimates([s.params for s in self._sizes])

    # --- Engine API (event loop side) ---------------------------------------------------------

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._sizes)

    @property
    def shares_layers_across_sizes(self) -> bool:
        """True when each store layer runs once per step for every size holding it, at any depth."""
        return self._share and self._order is not None

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="boomerang-local-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        self._inbox.put(("stop", None))
        await asyncio.to_thread(thread.join)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None and not self._stopping

    def load(self, size: str) -> SizeLoad:
        i = self._index(size)
        running = len(self._sizes[i].rows)
        total = sum(len(s.rows) for s in self._sizes)
        # a new request decodes in the batch the engine ran recently, not only in today's (at the arrival
        # rate that filled it, it fills again while this request runs), and its tokens wait for the
        # newcomers' prompts too
        expected = min(self.max_batch_size, max(total + self._num_waiting + 1, self.stats.recent_peak_batch()))
        return SizeLoad(
            running=running,
            waiting=self._waiting_by_size[i],
            prefill_tokens_per_s=self.stats.prefill_tokens_per_s(i),
            decode_step_s=self.stats.decode_step_s(max(total, 1)),
            decode_step_expected_s=self.stats.token_gap_s(expected),
            remaining_tokens=tuple(a.request.sampling.max_tokens - len(a.output) for a in list(self._sizes[i].rows)),
        )

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Admit ``request`` now (raising :class:`QueueFull` or :class:`EngineError` at once) and
        return its event stream. Closing the stream early aborts the request."""
        if not self.healthy():
            raise EngineError("the local engine is not running" + (f": {self._dead}" if self._dead else ""))
        i = self._index(request.size)
        self._validate(request)
        constraint = self._constraint(request)  # compiled here: a bad grammar is the client's 400, not a failed step
        with self._lock:
            if self._num_waiting >= self.max_queue:
                raise QueueFull(f"{self._num_waiting} requests are waiting (limit {self.max_queue})", 1.0)
            self._num_waiting += 1
            self._waiting_by_size[i] += 1
        p = request.sampling
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
        active = ActiveRequest(
            request=request,
            size=i,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            sampler=RequestSampler(p, self.vocab_size, request.prompt_ids, stop_ids, constraint),
            detok=IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens),
            stops=StopStrings(p.stop, p.include_stop_str_in_output),
            stop_ids=frozenset(stop_ids),
            arrived=time.perf_counter(),
            prompt_logprobs=[None] if p.prompt_logprobs is not None else None,
        )
        self._inbox.put(("add", active))
        return self._stream(active)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def _stream(self, active: ActiveRequest) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                item = await active.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("cancel", active))

    def _index(self, size: str) -> int:
        i = self._by_name.get(size.lower())
        if i is None:
            raise EngineError(f"this engine does not serve size '{size}'; it serves {', '.join(self.sizes)}")
        return i

    def _validate(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty: at least one token is needed")
        if n >= self.max_context:
            raise EngineError(f"the prompt has {n} tokens; the context holds {self.max_context}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"token ids out of range 0..{self.vocab_size - 1}: {bad[:5]}")

    def _constraint(self, request: GenerationRequest) -> Constraint | None:
        """The request's grammar matcher, or None when its output is free. Compiling a new grammar
        blocks for milliseconds (the compiler caches each one, so a repeated schema does not)."""
        spec = request.sampling.structured
        if spec is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        try:
            return self._grammars.constraint(spec)
        except GrammarError as exc:
            raise RequestRejected(f"{spec.param}: {exc}", param=spec.param, code="invalid_grammar") from None

    # --- worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._drain():
                    self._admit()
                    self._step()
        except BaseException as exc:  # a bug outside a step: fail everyone, report unhealthy
            log.exception("local engine worker died")
            self._dead = exc
        finally:
            reason = EngineError(f"the local engine stopped{': ' + str(self._dead) if self._dead else ''}")
            for active in [*self._waiting, *(a for s in self._sizes for a in s.rows)]:
                self._fail(active, reason)
            self._flush()

    def _drain(self) -> bool:
        """Apply queued adds, aborts and cancels; block while idle. False once asked to stop."""
        busy = bool(self._waiting) or any(s.rows for s in self._sizes)
        while True:
            if not busy:
                self._flush()  # events of aborts and failures must not wait for the next step
            try:
                kind, arg = self._inbox.get(block=not busy)
            except queue.Empty:
                return True
            if kind == "stop":
                return False
            if kind == "add":
                self._waiting.append(arg)
                self._by_id[arg.request.request_id] = arg
                busy = True
            elif kind in ("abort", "cancel"):
                active = self._by_id.get(arg) if kind == "abort" else arg
                if active is not None and not active.done:
                    self._finish(active)
                    if kind == "abort":
                        self._send(active, EngineError(f"request {active.request.request_id} was aborted"))
                busy = bool(self._waiting) or any(s.rows for s in self._sizes)
            if busy and self._inbox.empty():
                return True

    def _admit(self) -> None:
        running = sum(len(s.rows) for s in self._sizes)
        while self._waiting and running < self.max_batch_size:
            active = self._waiting.popleft()
            active.admitted = time.perf_counter()
            self._unwait(active)
            size = self._sizes[active.size]
            active.row = len(size.rows)
            size.rows.append(active)
            running += 1
        self.stats.note_batch(running)

    def _unwait(self, active: ActiveRequest) -> None:
        with self._lock:
            self._num_waiting -= 1
            self._waiting_by_size[active.size] -= 1

    def _step(self) -> None:
        works: list[SizeWork] = []
        parts: list[SizeParts] = []
        plan: list[Owners] = []  # per work: (request, first logit, logits)
        budget = self.prefill_tokens
        for size in self._sizes:
            if not size.rows:
                continue
            work = SizeWork(size.cache, [], [], [], [])
            owners: Owners = []
            for a in size.rows:
                if not a.prefilling:
                    work.decode.append(RowWork(a.row, a.computed, 1))
                    work.token_ids.append(a.output[-1])
                    owners.append((a, len(work.logit_index), 1))
                    work.logit_index.append(work.num_tokens - 1)
            for a in size.rows:
                if a.prefilling and budget > 0:
                    n = min(len(a.prompt) - a.computed, budget)
                    budget -= n
                    first = work.num_tokens
                    work.extend.append(RowWork(a.row, a.computed, n))
                    work.token_ids.extend(a.prompt[a.computed : a.computed + n])
                    wanted = range(first, first + n) if a.prompt_logprobs is not None else range(0)
                    if a.computed + n == len(a.prompt) and first + n - 1 not in wanted:
                        wanted = range(first + n - 1, first + n)
                    owners.append((a, len(work.logit_index), len(wanted)))
                    work.logit_index.extend(wanted)
            if work.token_ids:
                works.append(work)
                parts.append(size.parts)
                plan.append(owners)
        if not works:
            return
        t0 = time.perf_counter()
        try:
            logits = forward_step(parts, works, self._order, self._share)
            self._process(works, plan, logits)
        except Exception:
            log.exception("a local engine step failed")
            # the cause goes to the server log only: an error body never carries internals
            error = EngineError("the engine step serving this request failed; the server log has the cause")
            for owners in plan:
                for active, _, _ in owners:
                    if not active.done:
                        self._finish(active)
                        self._send(active, error)
        finally:
            self._flush()
        self._record(works, plan, time.perf_counter() - t0)
        for size in self._sizes:
            if not size.rows:
                size.cache.release()

    def _process(self, works: list[SizeWork], plan: list[Owners], logits: list[Any]) -> None:
        rows, samplers, owners_to_sample = [], [], []
        for work, owners, out in zip(works, plan, logits, strict=True):
            extend = iter(work.extend)
            for active, first, count in owners:
                if not active.prefilling:
                    active.computed += 1
                else:
                    n = next(extend).length
                    start = active.computed
                    active.computed += n
                    if active.prompt_logprobs is not None:
                        active.add_prompt_logprobs(out[first : first + count], start, n, self._text_of)
                    if active.prefilling:
                        continue
                    if active.request.sampling.max_tokens <= 0:
                        self._emit(active, None, None)
                        continue
                rows.append(out[first + count - 1])
                samplers.append(active.sampler)
                owners_to_sample.append(active)
        if not rows:
            return
        choices = sample(torch.stack(rows), samplers, self._text_of)
        for active, choice in zip(owners_to_sample, choices, strict=True):
            self._emit(active, choice.token_id, choice.logprob)

    def _emit(self, active: ActiveRequest, token: int | None, logprob: TokenLogprob | None) -> None:
        event = active.event_for(token, logprob, self.max_context)
        self._send(active, event)
        if event.finish_reason is not None:
            self._finish(active)

    def _finish(self, active: ActiveRequest) -> None:
        """Drop a request: free its row (the last row moves into it) or take it off the waiting list."""
        active.done = True
        if self._by_id.get(active.request.request_id) is active:
            del self._by_id[active.request.request_id]
        if active.row < 0:
            with contextlib.suppress(ValueError):
                self._waiting.remove(active)
                self._unwait(active)
            return
        size = self._sizes[active.size]
        last = size.rows.pop()
        if last is not active:
            size.cache.move_row(last.row, active.row, last.computed)
            last.row = active.row
            size.rows[active.row] = last
        active.row = -1

    def _fail(self, active: ActiveRequest, error: BaseException) -> None:
        if not active.done:
            self._finish(active)
            self._send(active, error)

    def _send(self, active: ActiveRequest, item: TokenEvent | BaseException) -> None:
        self._outbox.setdefault(active.loop, []).append((active, item))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one callback per loop."""
        box, self._outbox = self._outbox, {}
        for loop, items in box.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for active, _ in items:
                    if not active.done:
                        self._finish(active)

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self.tokenizer.decode([token_id]))
        return text

    def _record(self, works: list[SizeWork], plan: list[Owners], seconds: float) -> None:
        sizes = [owners[0][0].size for owners in plan if owners]
        prefill = [sum(r.length for r in w.extend) for w in works]
        decode = [len(w.decode) for w in works]
        self.stats.record(sizes, prefill, decode, seconds)


def _deliver(items: list[tuple[ActiveRequest, TokenEvent | BaseException]]) -> None:
    for active, item in items:
        active.events.put_nowait(item)
