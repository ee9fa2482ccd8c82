"""``engine: vllm``: one vLLM engine serving one size, its weights bound to the LayerStore.

A :class:`VllmReplica` is one vLLM ``LLMEngine`` built by :mod:`server.engines.vllm.loader` from a
folder that holds only the size's ``config.json`` and tokenizer files; every parameter is a view of
the store, so a replica costs its KV cache and engine overhead, not its weights. All replicas of a
process run on one :class:`~server.engines.vllm.stepper.VllmStepper` thread. Replicas are started,
scaled and restarted by :mod:`server.pool.tiers`; each one meets the :class:`Engine` contract by itself.

Requests stream through vLLM's engine API (``add_request`` / ``step`` with delta outputs); sampling
fields and stop strings map one to one onto vLLM's ``SamplingParams``; vLLM's own errors become
:class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from boomerang_core.assemble import size_config
from boomerang_core.family import Family
from server.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
    SizeLoad,
    TokenEvent,
    TokenLogprob,
)
from server.engines.vllm.stepper import VllmStepper

_GB = 1e9
log = logging.getLogger(__name__)
_replica_ids = itertools.count()


@dataclass(frozen=True)
class VllmSettings:
    """Per-replica vLLM settings (``engines.vllm`` in the deploy YAML). ``kv_cache_gb`` is the KV
    cache each replica reserves (1 GB = 1e9 bytes); ``overhead_gb`` is what an engine holds besides
    weights and KV cache (measured here: 30-55 MiB on CPU with the store's weights).
    ``tool_call_parser``: the vLLM tool parser a worker process reads tool calls with (``None``: the
    worker takes no ``tool_choice: auto``); the in-process replica's tools go through the gateway."""

    max_model_len: int = 2048
    max_num_seqs: int = 16
    enforce_eager: bool = True
    kv_cache_gb: float = 0.25
    overhead_gb: float = 0.08
    tool_call_parser: str | None = "hermes"

    @property
    def replica_bytes(self) -> int:
        return int((self.kv_cache_gb + self.overhead_gb) * _GB)


@dataclass(eq=False)
class _Stream:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException]
    completion_tokens: int = 0
    started: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class VllmReplica(Engine):
    """One vLLM engine for one size of ``family``; build it with :meth:`start` (seconds)."""

    def __init__(self, family: Family, size: str, settings: VllmSettings, stepper: VllmStepper) -> None:
        self.family = family
        self.size = family.by_name(size)
        self.settings = settings
        self.stepper = stepper
        self.replica_id = f"{size}-{next(_replica_ids)}"
        self._engine: Any = None
        self._dir: Path | None = None
        self._streams: dict[str, _Stream] = {}
        self._failure: str | None = None
        self.bound_bytes: dict[str, int] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def sizes(self) -> tuple[str, ...]:
        return (self.size.name,) if self._engine is not None else ()

    async def start(self) -> None:
        self.stepper.start()
        await self.stepper.call(self._build)

    def _build(self) -> None:
        """On the stepper thread: write the size's config folder and build the engine on the store."""
        from server.engines.vllm import loader as vllm_loader

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs on this thread
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        vllm_loader.register()
        store = self.family.store
        if store.tokenizer is None:
            raise EngineError(f"family '{self.family.name}' has no tokenizer")
        self._dir = Path(tempfile.mkdtemp(prefix=f"boomerang-{self.size.name}-"))
        (self._dir / "config.json").write_text(size_config(store, self.size.plan).to_json_string())
        store.tokenizer.save_pretrained(self._dir)
        token = vllm_loader.offer(store, self.size.plan)
        threads = torch.get_num_threads()  # vLLM drops the process to one thread; other engines share it
        s = self.settings
        try:
            args = EngineArgs(
                model=str(self._dir),
                dtype=cast(Any, str(store.dtype).removeprefix("torch.")),
                enforce_eager=s.enforce_eager,
                max_model_len=s.max_model_len,
                max_num_seqs=s.max_num_seqs,
                kv_cache_memory_bytes=int(s.kv_cache_gb * _GB),
                load_format=vllm_loader.LOAD_FORMAT,
                model_loader_extra_config={"token": token},
                generation_config="vllm",  # request fields are the only sampling defaults
                disable_log_stats=True,
                seed=0,
            )
            self._engine = LLMEngine.from_engine_args(args)
        except Exception as exc:
            self._cleanup_dir()
            raise EngineError(f"vLLM could not start size {self.size.name}: {exc}") from exc
        finally:
            vllm_loader.withdraw(token)
            torch.set_num_threads(threads)
        model = _model_of(self._engine)
        self.bound_bytes = dict(getattr(model, "boomerang_bound_bytes", {}))
        self.stepper.attach(self)

    async def stop(self) -> None:
        if self._engine is None and self._dir is None:
            return
        if self.stepper.alive:
            await self.stepper.call(self._teardown)
        else:
            self._teardown()

    def _teardown(self) -> None:
        self.stepper.detach(self)
        self._fail_all(EngineError(f"the replica of size {self.size.name} was stopped"))
        engine, self._engine = self._engine, None
        if engine is not None:
            release_engine(engine)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def healthy(self) -> bool:
        return self._engine is not None and self._failure is None and self.stepper.alive

    @property
    def failure(self) -> str | None:
        return self._failure

    def load(self, size: str) -> SizeLoad:
        running = sum(1 for s in self._streams.values() if s.started)
        return SizeLoad(running=running, waiting=len(self._streams) - running)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def model(self) -> Any:
        """The vLLM model (for tests that compare storages); call on the stepper thread."""
        return _model_of(self._engine)

    # --- requests -----------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if request.size != self.size.name:
            raise EngineError(f"this replica serves size {self.size.name}, not {request.size}")
        if not self.healthy():
            raise EngineError(f"the replica of size {self.size.name} is not running: {self._failure or 'stopped'}")
        self._check_context(request)
        stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue())
        return self._stream(stream)

    def _check_context(self, request: GenerationRequest) -> None:
        """Rejected (a 400) for a prompt vLLM would refuse: ``max_model_len`` may be below the model's context, which
        is what the gateway checks against. A longer generation is stopped at the limit (``length``)."""
        limit, prompt = self.settings.max_model_len, len(request.prompt_ids)
        if prompt >= limit:
            raise RequestRejected(
                f"the prompt has {prompt} tokens; size {self.size.name} is served with a context of {limit}",
                param="prompt", code="context_length_exceeded",
            )  # fmt: skip

    async def _stream(self, stream: _Stream) -> AsyncIterator[TokenEvent]:
        rid = stream.request.request_id
        await self.stepper.call(lambda: self._add(stream))
        finished = False
        try:
            while True:
                item = await stream.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(rid)

    def _add(self, stream: _Stream) -> None:
        if self._engine is None:
            raise EngineError(f"the replica of size {self.size.name} is not running")
        rid = stream.request.request_id
        if rid in self._streams:
            raise EngineError(f"request id {rid!r} is already in flight on this replica")
        try:
            self._engine.add_request(rid, {"prompt_token_ids": list(stream.request.prompt_ids)},
                                     vllm_sampling(stream.request.sampling))  # fmt: skip
        except Exception as exc:
            raise EngineError(f"vLLM refused the request: {exc}") from exc
        self._streams[rid] = stream

    async def abort(self, request_id: str) -> None:
        if request_id not in self._streams or not self.stepper.alive:
            return

        def drop() -> None:
            if self._streams.pop(request_id, None) is not None and self._engine is not None:
                self._engine.abort_request([request_id])

        await self.stepper.call(drop)

    # --- on the stepper thread ----------------------------------------------------------------

    def busy(self) -> bool:
        return self._engine is not None and bool(self._streams)

    def step_once(self) -> None:
        for out in self._engine.step():
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            event = self._event(stream, out)
            if event.finish_reason is not None:
                del self._streams[out.request_id]
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, event)

    def step_failed(self, error: BaseException) -> None:
        self._failure = f"{type(error).__name__}: {error}"
        self._fail_all(EngineError(f"the replica of size {self.size.name} failed: {self._failure}"))
        engine, self._engine = self._engine, None
        try:
            release_engine(engine)
        except Exception:
            log.exception("releasing a failed vLLM engine")

    def _fail_all(self, error: EngineError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, error)

    def _event(self, stream: _Stream, out: Any) -> TokenEvent:
        completion = out.outputs[0]
        ids = tuple(int(t) for t in completion.token_ids)
        stream.completion_tokens += len(ids)
        first = not stream.started
        stream.started = True
        finish = completion.finish_reason if out.finished else None
        if finish not in (None, "stop", "length"):
            finish = "stop"  # "abort" never reaches a live stream: aborted streams are dropped first
        sampling = stream.request.sampling
        logprobs: tuple[TokenLogprob, ...] = ()
        if sampling.logprobs is not None and completion.logprobs:
            logprobs = tuple(_logprob(t, lp, sampling.logprobs) for t, lp in zip(ids, completion.logprobs, strict=True))
        prompt_logprobs = None
        if first and sampling.prompt_logprobs is not None and out.prompt_logprobs is not None:
            prompt = stream.request.prompt_ids
            prompt_logprobs = tuple(
                None if lp is None else _logprob(prompt[i], lp, sampling.prompt_logprobs)
                for i, lp in enumerate(out.prompt_logprobs)
            )
        return TokenEvent(
            token_ids=ids,
            text=completion.text,
            logprobs=logprobs,
            finish_reason=finish,
            prompt_tokens=len(stream.request.prompt_ids),
            completion_tokens=stream.completion_tokens,
            prompt_logprobs=prompt_logprobs,
            queue_s=(time.perf_counter() - stream.arrived) if first else None,
        )


def vllm_sampling(p: SamplingParams) -> Any:
    """The gateway's sampling fields, one to one, as vLLM ``SamplingParams`` (streamed as deltas)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    return VSamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else 0,
        seed=p.seed,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs,
        ignore_eos=p.ignore_eos,
        repetition_penalty=p.repetition_penalty,
        min_p=p.min_p,
        min_tokens=p.min_tokens,
        logit_bias=dict(p.logit_bias) or None,
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=p.skip_special_tokens,
        structured_outputs=StructuredOutputsParams(**p.structured.as_vllm()) if p.structured else None,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprob(token: int, table: Any, top_n: int) -> TokenLogprob:
    """One position of vLLM's logprobs (token id -> Logprob with rank) as a :class:`TokenLogprob`."""
    chosen = table[token]
    ranked = sorted(((lp.rank or 0, tid, lp) for tid, lp in table.items() if lp.rank and lp.rank <= top_n))
    top = tuple((int(tid), lp.decoded_token or "", float(lp.logprob)) for _, tid, lp in ranked)
    return TokenLogprob(token_id=token, token=chosen.decoded_token or "", logprob=float(chosen.logprob), top=top)


def release_engine(engine: Any) -> None:
    """Shut one in-process engine down WITHOUT vLLM's process-wide teardown.

    vLLM's own shutdown (also run by a finalizer when the engine is collected) ends with
    ``cleanup_dist_env_and_memory()``, which destroys the distributed groups that every engine of
    this process shares: the next step of any other engine then fails. So the finalizer is
    detached and only this engine's executor, scheduler and structured-output backend are closed.
    """
    client = engine.engine_core  # InprocClient
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()
    core = client.engine_core
    core.structured_output_manager.clear_backend()
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    gc.collect()


def _model_of(engine: Any) -> Any:
    """The torch model inside an in-process vLLM engine (engine core -> executor -> worker)."""
    return engine.model_executor.driver_worker.worker.model_runner.model
