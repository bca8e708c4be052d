"""Generation for many prompts with expert-aware micro-batching (`generate_many`) and the decode pool.

This module owns the decode loop of a wrapped model over a list of requests: admission (first come,
first served, into a pool of at most ``pool_size`` requests), the rounds in which every pooled
request decodes one token in the micro-batches the planner forms (`DecodePool`, shared with the
server's engine), and `generate_many` on top of it. The pieces it drives live beside it:
routing signatures in `moe_infer.serving.signatures`, the partition and the regroup decision in
`moe_infer.serving.schedule`, the KV-cache moves in `moe_infer.serving.kv_cache`, token choice in
`moe_infer.serving.sampling`. It does not route, cache or prefetch experts (the executor does).

Scheduling ("expert", ExpertFlow token scheduling / Read-ME lookahead batching): every request
carries a routing signature, the probability that its next token uses each expert of each MoE
layer ([L, E]). A micro-batch then expects to activate ``sum over (l, e) of 1 - prod_i (1 - s_i)``
distinct experts. Signatures: each request's own recent routing (`RecentRouting`, the default), or a
predictor's routing of the request's next token made before its forward pass (`PredictedRouting`:
Read-ME's pre-gating router from the token window, or ExpertFlow's path predictor from the token
window and the previous token's routing). The pool is partitioned (greedy fill, then pairwise swaps) to make the sum
of that over micro-batches small. The partition is recomputed between decode steps and applied
only when it saves at least ``regroup_threshold`` expected experts per micro-batch, because
regrouping moves KV caches. "fcfs" fills micro-batches in admission order and never regroups.
Both run every pooled request one token per round, with the same number of micro-batches, so no
pooled request ever waits; queued requests are admitted in arrival order as pooled ones finish.

Exactness: a request is prefilled alone (batch 1, no padding); in a micro-batch its cache is
left-padded to the longest member, padding masked out, with its own position ids, exactly as
`transformers` batches left-padded prompts; the tokens are chosen per request, with the logits
processors and stopping criteria `model.generate` builds from the generation config and a
per-request ``torch.Generator`` (`moe_infer.serving.sampling`), so a request gets the tokens it gets
when generated alone up to floating-point summation order.

`DecodePool` is the part the server's engine (`moe_infer.serving.engine`) shares: prefill (whole
or chunked), joining and leaving between rounds, decode rounds in the planner's micro-batches, and
failure isolation (a micro-batch whose step raises is rolled back and its members retried alone).

KV movement (`moe_infer.serving.kv_cache`): a micro-batch holds one `DynamicCache` per attention layer;
regrouping cuts a request's rows out of its old micro-batch and stacks them into the new one.

Shape legend: B requests in a micro-batch, S cached positions, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from moe_infer.api import executor
from moe_infer.errors import ConfigError
from moe_infer.models import cache_argument, decode_tokens, encode_text, output_cache
from moe_infer.serving.kv_cache import MicroBatch, PooledRequest, cache_of, check_model
from moe_infer.serving.sampling import RequestSampler, sampling_params
from moe_infer.serving.schedule import GroupPlanner, SchedulerStats, check_int
from moe_infer.serving.signatures import SignatureSource, signature_name, signature_source
# the rest of moe_infer.batching's names, for its old import path
from moe_infer.serving.schedule import SCHEDULERS, expected_experts, partition, simulate_schedule  # noqa: F401
from moe_infer.serving.signatures import PredictedRouting, RecentRouting  # noqa: F401


class DecodePool:
    """The requests being decoded and their micro-batches; what `generate_many` and the server's
    engine (`moe_infer.serving.engine`) both drive.

    A request is prefilled alone (`prefill`: its whole prompt, or the next chunk of it), `join`s
    with its first token chosen, then decodes one token per `round` in the micro-batch the planner
    puts it in, and leaves when it is done (or through `leave`, e.g. cancelled: its KV cache rows are
    dropped at once). Within the ``with`` block the pool observes the routing of every forward pass
    it runs (signatures, distinct experts per micro-batch). One thread drives a pool and its model.
    """

    def __init__(self, model: nn.Module, planner: GroupPlanner, signatures: SignatureSource, stats: SchedulerStats):
        self.model, self.planner, self.signatures, self.stats = model, planner, signatures, stats
        self.executor = executor(model)
        self.batches: list[MicroBatch] = []
        self.joined: list[PooledRequest] = []  # joined since the last round, in order
        self.on_micro_batch: Callable[[int, float], None] | None = None  # (size, distinct experts per MoE layer)
        self._rows: list[int] = []  # request id of each row of the forward pass in flight
        self._layer_position = {layer.layer_idx: i for i, layer in enumerate(self.executor.layers)}
        self._experts_seen: list[set[int]] | None = None
        self._device = model.get_input_embeddings().weight.device

    def __enter__(self) -> "DecodePool":
        for layer in self.executor.layers:
            layer.routing_observers.append(self._observer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.executor.layers:
            layer.routing_observers.remove(self._observer)

    @property
    def requests(self) -> list[PooledRequest]:
        return [r for b in self.batches for r in b.requests] + self.joined

    def __len__(self) -> int:
        return sum(len(b.requests) for b in self.batches) + len(self.joined)

    def _observer(self, layer, hidden: Tensor, routing) -> None:
        position = self._layer_position[layer.layer_idx]
        if self._rows:
            self.signatures.observe(self._rows, position, hidden, routing)
        if self._experts_seen is not None:
            self._experts_seen[position].update(routing.expert_ids.flatten().tolist())

    def prefill(self, request: PooledRequest, max_tokens: int | None = None) -> Tensor | None:
        """Feed the request's next prompt tokens (all that remain, or at most ``max_tokens``) through
        the model, batch 1, into its own KV cache. Returns the next-token logits [V] once the whole
        prompt is in, None before."""
        start = request.prefilled
        end = len(request.prompt) if max_tokens is None else min(len(request.prompt), start + max_tokens)
        if start == 0:
            self.signatures.extend(request.index, request.prompt)
        input_ids = torch.tensor([request.prompt[start:end]], device=self._device)
        extra = {}
        if start:  # a later chunk: positions go on from the cached ones
            extra = dict(position_ids=torch.arange(start, end, device=self._device)[None],
                         **cache_argument(self.model, request.prefill_cache))
        self._rows = [request.index] * (end - start)
        try:
            out = self.model(input_ids=input_ids, attention_mask=torch.ones(1, end, dtype=torch.long, device=self._device),
                             use_cache=True, logits_to_keep=1, **extra)
        finally:
            self._rows = []
        self.stats.prefill_tokens += end - start
        request.prefill_cache, request.prefilled = output_cache(out), end
        if end < len(request.prompt):
            return None
        request.cache, request.prefill_cache = cache_of(request.prefill_cache), None
        return out.logits[0, -1].float()

    def accept(self, request: PooledRequest, token: int) -> None:
        """Record the request's next token (the input of its next step)."""
        request.tokens.append(token)
        self.signatures.extend(request.index, [token])

    def join(self, request: PooledRequest) -> None:
        """A prefilled request with its first token accepted decodes from the next round on."""
        self.joined.append(request)

    def leave(self, request: PooledRequest) -> None:
        """Drop a request now (cancelled, or done outside a round): its KV cache rows are freed."""
        if request in self.joined:
            self.joined.remove(request)
        for batch in self.batches:
            if request in batch.requests:
                self._drop(batch, [row for row, r in enumerate(batch.requests) if r is not request])
        self.batches = [b for b in self.batches if b.requests]
        request.cache = request.prefill_cache = None
        self.signatures.forget(request.index)

    def round(self, decide: Callable[[PooledRequest, Tensor], None],
              fail: Callable[[PooledRequest, Exception], None] | None = None) -> None:
        """One decode step of every pooled request, in the micro-batches the planner forms now.

        ``decide(request, logits [V])`` accepts the request's next token and sets ``request.done``;
        done requests leave after their micro-batch's step. With ``fail``, a request whose step or
        decision raises fails alone: ``fail(request, error)``, and it leaves; a micro-batch whose
        forward pass raises is rolled back and its members are retried one by one. Without
        ``fail``, the first error propagates."""
        self._form()
        for batch in list(self.batches):
            for stepped, logits in self._run(batch, fail):
                for row, request in enumerate(stepped.requests):
                    if request.done:  # its step failed
                        continue
                    try:
                        decide(request, logits[row])
                    except Exception as error:
                        if fail is None:
                            raise
                        request.done = True
                        fail(request, error)
                self._drop(stepped, [row for row, r in enumerate(stepped.requests) if not r.done])
        self.batches = [b for b in self.batches if b.requests]

    def _run(self, batch: MicroBatch, fail) -> list[tuple[MicroBatch, Tensor | None]]:
        """[(micro-batch, logits [B, V])] of one step of ``batch``, its members alone if it fails
        (logits None: that member failed)."""
        try:
            return [(batch, self._step(batch))]
        except Exception as error:
            if fail is None:
                raise
            if len(batch.requests) == 1:
                batch.requests[0].done = True
                fail(batch.requests[0], error)
                return [(batch, None)]
        released, copied = batch.release(list(range(len(batch.requests))))  # the failed step left no trace
        self.stats.kv_bytes_moved += copied
        singles = [MicroBatch([request], self.model, self.stats) for request in released]
        self.batches.remove(batch)
        self.batches.extend(singles)
        return [result for single in singles for result in self._run(single, fail)]

    def _step(self, batch: MicroBatch) -> Tensor:
        self._rows = [r.index for r in batch.requests]
        self._experts_seen = [set() for _ in self.executor.layers]
        try:
            logits = batch.step(self.model)
            distinct = float(np.mean([len(s) for s in self._experts_seen]))
        finally:
            self._rows, self._experts_seen = [], None
        self.stats.micro_batches += 1
        self.stats.decode_tokens += len(batch.requests)
        self.stats.distinct_experts += distinct
        if self.on_micro_batch is not None:
            self.on_micro_batch(len(batch.requests), distinct)
        return logits

    def _drop(self, batch: MicroBatch, keep: list[int]) -> None:
        """Keep only the rows ``keep`` of ``batch``; the others leave (their signatures are forgotten)."""
        if len(keep) == len(batch.requests):
            return
        for row, request in enumerate(batch.requests):
            if row not in keep:
                self.signatures.forget(request.index)
        if keep:
            self.stats.kv_bytes_moved += batch.keep(keep)
        else:
            batch.requests = []

    def _form(self) -> None:
        """The micro-batches of the next round (the planner decides, `_apply` moves the KV caches)."""
        by_index = {r.index: r for r in self.requests}
        groups, regrouped = self.planner.next_groups([[r.index for r in b.requests] for b in self.batches],
                                                     [r.index for r in self.joined], self.signatures.signature)
        self.stats.regroups += int(regrouped)
        self.batches = self._apply([[by_index[i] for i in g] for g in groups])
        self.joined = []

    def _apply(self, target: list[list[PooledRequest]]) -> list[MicroBatch]:
        """Turn the current micro-batches into ``target`` groups, moving only the KV caches of requests
        whose group changes: a target group that keeps most of an old micro-batch reuses it."""
        batches, stats = self.batches, self.stats
        result = []
        used: set[int] = set()
        for group in target:
            members = {r.index for r in group}
            best, best_overlap = None, 0
            for i, batch in enumerate(batches):
                overlap = sum(1 for r in batch.requests if r.index in members)
                if i not in used and overlap > best_overlap:
                    best, best_overlap = i, overlap
            result.append((group, best))
            if best is not None:
                used.add(best)
        # release every request that leaves its micro-batch
        placement = {r.index: gi for gi, (group, _) in enumerate(result) for r in group}
        for i, batch in enumerate(batches):
            owner = next((gi for gi, (_, b) in enumerate(result) if b == i), None)
            leaving = [row for row, r in enumerate(batch.requests) if owner is None or placement[r.index] != owner]
            if leaving:
                stats.kv_bytes_moved += batch.release(leaving)[1]
        formed = []
        for group, i in result:
            base = batches[i] if i is not None and batches[i].requests else None
            newcomers = [r for r in group if base is None or r not in base.requests]
            if base is None:
                formed.append(MicroBatch(group, self.model, stats))
            elif newcomers:
                released, _ = base.release(list(range(len(base.requests))))
                formed.append(MicroBatch(released + newcomers, self.model, stats))
            else:
                formed.append(base)
        return formed


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated token ids per prompt, in prompt order
    stats: SchedulerStats


class BatchGenerator:
    """Runs `generate_many`; see the module docstring for the scheduling."""

    def __init__(self, model: nn.Module, *, max_batch_size: int = 8, pool_size: int | None = None,
                 scheduler: str | None = None, signatures: SignatureSource | None = None, predictor: Any = None,
                 regroup_threshold: float = 1.0, regroup_interval: int = 1, max_new_tokens: int = 32,
                 seed: int | Sequence[int] = 0, tokenizer=None, **generation_fields: Any):
        check_model(model)  # before any work
        self.model = model
        self.executor = executor(model)
        check_int("max_batch_size", max_batch_size, 1)
        self.max_batch_size = max_batch_size
        self.pool_size = 4 * max_batch_size if pool_size is None else pool_size
        check_int("pool_size", self.pool_size, 1)
        if scheduler is None:
            scheduler = "expert" if self.executor.config.token_scheduling else "fcfs"
        self.planner = GroupPlanner(scheduler, max_batch_size, regroup_threshold, regroup_interval)
        self.scheduler = scheduler
        self.signatures = signature_source(model, scheduler, signatures, predictor)
        self.params = sampling_params(model, max_new_tokens=max_new_tokens, **generation_fields)
        self.seed, self.tokenizer = seed, tokenizer

    @torch.no_grad()
    def run(self, prompts: Sequence[Sequence[int]]) -> GenerationResult:
        requests = self._requests(prompts)
        stats = SchedulerStats(scheduler=self.scheduler, signatures=signature_name(self.scheduler, self.signatures),
                               requests=len(requests))
        started = time.perf_counter()
        try:
            with DecodePool(self.model, self.planner, self.signatures, stats) as pool:
                self._loop(pool, requests)
        finally:
            for request in requests:
                self.signatures.forget(request.index)
        stats.seconds = time.perf_counter() - started
        return GenerationResult([r.tokens for r in requests], stats)

    def _requests(self, prompts: Sequence[Sequence[int]]) -> list[PooledRequest]:
        if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence):
            raise ConfigError("prompts must be a list of token-id lists (or of strings, with a tokenizer)")
        seeds = [self.seed + i for i in range(len(prompts))] if isinstance(self.seed, int) else list(self.seed)
        if len(seeds) != len(prompts):
            raise ConfigError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
        vocab = self.model.get_input_embeddings().num_embeddings
        requests = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            ids = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
            if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ConfigError(f"prompt {i}: expected a non-empty list of token ids in [0, {vocab})")
            sampler = RequestSampler(self.model, self.params, ids, seed, tokenizer=self.tokenizer)
            requests.append(PooledRequest(index=i, prompt=ids, sampler=sampler))
        return requests

    @staticmethod
    def _decide(pool: DecodePool, request: PooledRequest, logits: Tensor) -> None:
        pool.accept(request, request.sampler.choose(logits))
        request.done = request.sampler.done

    def _loop(self, pool: DecodePool, requests: list[PooledRequest]) -> None:
        queue = deque(requests)
        round_index = 0
        while queue or len(pool):
            while queue and len(pool) < self.pool_size:  # admission, first come first served
                request = queue.popleft()
                pool.stats.max_wait_rounds = max(pool.stats.max_wait_rounds, round_index)
                self._decide(pool, request, pool.prefill(request))
                if request.done:
                    request.cache = None
                else:
                    pool.join(request)
            pool.round(lambda request, logits: self._decide(pool, request, logits))
            round_index += 1
            pool.stats.rounds = round_index


def generate_many(model: nn.Module, prompts: Sequence[Sequence[int] | str], *, max_batch_size: int = 8,
                  tokenizer=None, return_stats: bool = False, **options: Any):
    """Generate for every prompt of ``prompts`` with a wrapped model, batching requests so that each
    micro-batch activates few distinct experts (``scheduler="expert"``; the default when the model's
    `MoEConfig.token_scheduling` is True, "fcfs" otherwise).

    ``prompts``: lists of token ids, or strings with ``tokenizer`` (byte-level models without a
    tokenizer read strings as UTF-8). Scheduling options: ``pool_size`` [4 * max_batch_size],
    ``scheduler``, ``signatures`` (a `SignatureSource`; default: each request's recent routing),
    ``predictor`` (a "pregate" or "expertflow" predictor, or the path of a saved one: signatures are
    its prediction of each request's next token, `PredictedRouting`; default: the wrapped model's
    ``MoEConfig.predictor`` when it is such a predictor and the scheduler is "expert"),
    ``regroup_threshold``, ``regroup_interval``. ``seed``: request i samples with ``seed + i``, or
    a list of seeds. Every other option is a `GenerationConfig` field (``max_new_tokens`` [32],
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
    ``eos_token_id`` (an id or a list), ``stop_strings`` (with ``tokenizer``), ...), merged into the
    model's generation config and applied with transformers' own logits processors and stopping
    criteria, as ``model.generate`` applies them (`moe_infer.serving.sampling`).
    Returns the generated token ids per prompt (strings when the prompts were strings), and the
    `SchedulerStats` too with ``return_stats=True``.
    """
    as_text = bool(prompts) and all(isinstance(p, str) for p in prompts)
    token_prompts = [encode_text(tokenizer, p) for p in prompts] if as_text else prompts
    result = BatchGenerator(model, max_batch_size=max_batch_size, tokenizer=tokenizer, **options).run(token_prompts)
    outputs = [decode_tokens(tokenizer, t) for t in result.tokens] if as_text else result.tokens
    return (outputs, result.stats) if return_stats else outputs
