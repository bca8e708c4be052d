"""The serving engine: continuous, expert-aware batching of requests that arrive while others run.

Threads: ONE engine thread drives the model. HTTP handlers, on any thread or event loop, only
``submit``, ``cancel`` and ``call`` (which hand work to the engine thread under a lock) and read
each request's results from its own sink; they never run the model. So the model is never driven
from two threads at once, whatever the expert cache's own thread safety. Building a request
(``make_request``: its logits processors and stopping criteria) reads the model's configuration
only, so the caller's thread may do it and refuse bad fields at once.

Each iteration of the engine thread, between forward passes:
1. cancelled requests leave: a waiting one is dropped, an admitted one frees its slot and KV cache;
2. waiting requests are admitted first come first served while the pool (prefilling + decoding)
   has fewer than ``pool_size`` requests; more than ``max_queue`` waiting: ``submit`` raises
   `Overloaded` (the server answers 503) instead of holding unbounded memory;
3. prefill, chunked: at most ``prefill_chunk`` prompt tokens this iteration, of the admitted
   requests in order; a long prompt goes in over several iterations, so the running requests wait
   at most one chunk's forward pass for their next token; a request whose prompt is in chooses its
   first token and joins the decode pool;
4. decode: every pooled request decodes one token, in the micro-batches the planner forms
   (``scheduler``: "expert" groups requests by routing signature, "fcfs" in arrival order;
   `moe_infer.serving.batching.DecodePool`).
A request whose forward pass or token choice fails gets a `Failed` event and leaves; the others go
on (a failed micro-batch is rolled back and its members retried alone). `close` fails what is
still in flight ("shutting down") and joins the thread.

Events a request's sink receives, in the engine thread: `Delta` (new final text, its tokens and
their logprobs), then exactly one of `Finished` or `Failed`. Sinks must not block.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_infer.serving.batching import DecodePool
from moe_infer.serving.kv_cache import PooledRequest, check_model
from moe_infer.serving.schedule import GroupPlanner, SchedulerStats, check_int
from moe_infer.serving.signatures import signature_name, signature_source
from moe_infer.serving.sampling import RequestSampler, SamplingParams
from moe_infer.serving.text import TextAssembler
from moe_infer.errors import ConfigError

__all__ = ["Delta", "Engine", "EngineClosed", "EngineRequest", "Failed", "Finished", "Overloaded", "TokenLogprob"]

log = logging.getLogger("moe_infer.serving")


class Overloaded(RuntimeError):
    """The queue of waiting requests is full."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log-probability under the model's distribution (log-softmax of the logits)
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, most likely first


@dataclass
class Delta:
    text: str  # final text added by ``tokens`` (may be empty when text is held back at the end)
    tokens: list[int]
    logprobs: list[TokenLogprob] | None


@dataclass
class Finished:
    reason: str  # "stop" (eos or a stop string), "length" (max tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500  # the HTTP status the failure deserves


@dataclass(eq=False)
class EngineRequest(PooledRequest):
    """A request of the engine; `Engine.make_request` builds it."""

    sink: Callable[[Any], None] | None = None
    text: TextAssembler | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k
    submitted_at: float = 0.0
    last_token_at: float | None = None
    _pending: list[int] = field(default_factory=list)  # tokens whose text is held back
    _pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    _closed: bool = False  # its last event has been sent


class Engine:
    """Drives one wrapped model from one thread for many concurrent requests (see the module docstring).

    ``metrics``: an object with the methods of `moe_infer.serving.metrics.ServingMetrics` (optional).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch_size: int = 8, pool_size: int | None = None,
                 max_queue: int = 64, scheduler: str | None = None, prefill_chunk: int = 512,
                 signatures: Any = None, predictor: Any = None, regroup_threshold: float = 1.0,
                 regroup_interval: int = 1, metrics: Any = None):
        from moe_infer.api import executor

        check_model(model)
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            check_int(name, value, 1)
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.executor = executor(model)
        self.pool_size = 4 * max_batch_size if pool_size is None else pool_size
        check_int("pool_size", self.pool_size, 1)
        self.max_queue, self.prefill_chunk, self.max_batch_size = max_queue, prefill_chunk, max_batch_size
        self.scheduler = scheduler or ("expert" if self.executor.config.token_scheduling else "fcfs")
        self.planner = GroupPlanner(self.scheduler, max_batch_size, regroup_threshold, regroup_interval)
        self.signatures = signature_source(model, self.scheduler, signatures, predictor)
        self.stats = SchedulerStats(scheduler=self.scheduler, signatures=signature_name(self.scheduler, self.signatures))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.device = model.get_input_embeddings().weight.device
        self._lock = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()  # guarded by _lock
        self._cancelled: list[EngineRequest] = []  # guarded by _lock
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # guarded by _lock
        self._closing = False  # guarded by _lock
        self._prefilling: list[EngineRequest] = []  # engine thread only
        self._pool: DecodePool | None = None  # engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="moe-infer-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def make_request(self, prompt: Sequence[int], params: SamplingParams, *, seed: int, sink: Callable[[Any], None],
                     stop: Sequence[str] = (), logprobs: int | None = None) -> EngineRequest:
        """A request for ``prompt`` (token ids); ``ValueError`` for ids outside the vocabulary or a
        config transformers refuses. Reads the model's configuration only: any thread may call it."""
        prompt = [int(t) for t in prompt]
        if not prompt or not all(0 <= t < self.vocab_size for t in prompt):
            raise ConfigError(f"the prompt must be a non-empty list of token ids in [0, {self.vocab_size})")
        sampler = RequestSampler(self.model, params, prompt, seed, tokenizer=self.tokenizer, device=self.device)
        return EngineRequest(index=next(self._ids), prompt=prompt, sampler=sampler, sink=sink,
                             text=TextAssembler(self.tokenizer, stop), logprobs=logprobs)

    def submit(self, requests: Sequence[EngineRequest]) -> None:
        """Queue ``requests`` (all or none): `Overloaded` when the queue has no room for them all,
        `EngineClosed` once `close` has begun."""
        now = time.perf_counter()
        with self._lock:
            if self._closing or not self._thread.is_alive():
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting and the queue holds "
                                 f"{self.max_queue}; retry later")
            for request in requests:
                request.submitted_at = now
                self._waiting.append(request)
            self.stats.requests += len(requests)
            waiting = len(self._waiting)
            self._lock.notify()
        if self.metrics is not None:
            self.metrics.waiting(waiting)

    def cancel(self, request: EngineRequest) -> None:
        """Stop ``request`` (the client went away): it leaves at the next step, freeing its slot and
        KV cache. Idempotent; a finished request is left alone."""
        with self._lock:
            if not request._closed:
                self._cancelled.append(request)
                self._lock.notify()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function()`` on the engine thread between two steps; its result in the future."""
        future: Future = Future()
        with self._lock:
            if self._closing or not self._thread.is_alive():
                future.set_exception(EngineClosed("the server is shutting down"))
                return future
            self._calls.append((function, future))
            self._lock.notify()
        return future

    def close(self, timeout: float | None = 60.0) -> None:
        """Fail every request still queued or running ("shutting down") and join the engine thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        with torch.no_grad(), DecodePool(self.model, self.planner, self.signatures, self.stats) as pool:
            self._pool = pool
            if self.metrics is not None:
                pool.on_micro_batch = self.metrics.micro_batch
            while True:
                with self._lock:
                    while not (self._waiting or self._cancelled or self._calls or self._closing
                               or self._prefilling or len(pool)):
                        self._refresh_metrics(idle=True)
                        self._lock.wait(timeout=1.0)
                    if self._closing:
                        leftover = list(self._waiting) + self._prefilling + pool.requests
                        self._waiting.clear()
                        calls, self._calls = self._calls, []
                        break
                    cancelled, self._cancelled = self._cancelled, []
                    calls, self._calls = self._calls, []
                    for request in cancelled:
                        if request in self._waiting:
                            self._waiting.remove(request)
                            self._finish(request, Finished("cancelled", len(request.prompt), 0))
                    while self._waiting and len(self._prefilling) + len(pool) < self.pool_size:
                        self._prefilling.append(self._waiting.popleft())
                for function, future in calls:
                    self._call(function, future)
                try:
                    for request in cancelled:
                        self._leave(request, Finished("cancelled", len(request.prompt), len(request.tokens)))
                    self._prefill_step(pool)
                    if len(pool):
                        pool.round(self._decide, self._fail)
                except Exception as error:  # a bug outside the per-request isolation: fail what is in flight
                    log.exception("engine step failed; failing the requests in flight")
                    for request in self._prefilling + pool.requests:
                        self._fail(request, error)
                    self._prefilling, pool.batches, pool.joined = [], [], []
                self._refresh_metrics(idle=False)
        for function, future in calls:
            future.set_exception(EngineClosed("the server is shutting down"))
        for request in leftover:
            self._finish(request, Failed("the server is shutting down; the request was not completed", 503))
        self._pool = None

    def _call(self, function: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(function())
        except Exception as error:
            future.set_exception(error)

    def _prefill_step(self, pool: DecodePool) -> None:
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            request = self._prefilling[0]
            tokens = min(budget, len(request.prompt) - request.prefilled)
            try:
                logits = pool.prefill(request, tokens)
            except Exception as error:
                self._prefilling.pop(0)
                self._fail(request, error)
                continue
            budget -= tokens
            if self.metrics is not None:
                self.metrics.tokens(prompt=tokens)
            if logits is None:
                continue  # more of this prompt next iteration (budget is spent)
            self._prefilling.pop(0)
            try:
                self._decide(request, logits)
            except Exception as error:
                self._fail(request, error)
                continue
            if request.done:
                self._leave(request, None)
            else:
                pool.join(request)

    def _decide(self, request: EngineRequest, logits: Tensor) -> None:
        """Choose the request's next token, emit the text it makes final, finish it when done."""
        logprobs = torch.log_softmax(logits.float(), dim=-1) if request.logprobs is not None else None
        token = request.sampler.choose(logits)
        self._pool.accept(request, token)
        text = request.text.add(token)
        request.done = request.sampler.done or request.text.stopped
        if request.done:
            text += request.text.finish()
        now = time.perf_counter()
        if self.metrics is not None:
            if request.last_token_at is None:
                self.metrics.first_token(now - request.submitted_at)
            else:
                self.metrics.inter_token(now - request.last_token_at)
            self.metrics.tokens(generated=1)
        request.last_token_at = now
        request._pending.append(token)
        if logprobs is not None:
            top = torch.topk(logprobs, request.logprobs) if request.logprobs else None
            request._pending_logprobs.append(TokenLogprob(
                token, float(logprobs[token]),
                list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
        if text or request.done:
            self._send(request, Delta(text, request._pending, request._pending_logprobs if logprobs is not None else None))
            request._pending, request._pending_logprobs = [], []
        if request.done:
            reason = "stop" if request.text.stopped else request.sampler.finish_reason
            self._finish(request, Finished(reason, len(request.prompt), len(request.tokens)))

    def _fail(self, request: EngineRequest, error: Exception) -> None:
        log.error("request %d failed: %s: %s", request.index, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        request.done = True
        request.cache = request.prefill_cache = None
        self.signatures.forget(request.index)
        self._finish(request, Failed(f"generation failed: {type(error).__name__}: {error}"))

    def _leave(self, request: EngineRequest, event: Any) -> None:
        """Take ``request`` out of wherever it is (prefilling, the decode pool) and free its KV cache."""
        if request in self._prefilling:
            self._prefilling.remove(request)
            request.cache = request.prefill_cache = None
            self.signatures.forget(request.index)
        elif self._pool is not None:
            self._pool.leave(request)  # no-op for a request that is not pooled
        if event is not None:
            self._finish(request, event)

    def _finish(self, request: EngineRequest, event: Any) -> None:
        if request._closed:
            return
        request._closed = True
        if self.metrics is not None:
            self.metrics.finished("cancelled" if isinstance(event, Finished) and event.reason == "cancelled"
                                  else "failed" if isinstance(event, Failed) else "completed")
        self._send(request, event)

    def _send(self, request: EngineRequest, event: Any) -> None:
        try:
            request.sink(event)
        except Exception:  # a sink must not take the engine down
            log.exception("request %d: its sink raised", request.index)

    def _refresh_metrics(self, *, idle: bool) -> None:
        if self.metrics is None:
            return
        pool = self._pool
        self.metrics.running(len(self._prefilling) + (len(pool) if pool is not None else 0))
        self.metrics.waiting(len(self._waiting))
        self.metrics.expert_stats(self.executor, force=idle)
