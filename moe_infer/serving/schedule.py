"""The expert-aware scheduler: which pooled requests decode together in each round.

Owns the expected number of distinct experts of a micro-batch (`expected_experts`), the partition
of a pool into micro-batches that expect few (`partition`: greedy fill, then pairwise swaps), the
per-round decision to keep or regroup (`GroupPlanner`, "expert" or "fcfs"), the statistics of a run
(`SchedulerStats`) and the trace-driven replay of the scheduler without a model
(`simulate_schedule`). Works on request ids and signatures only: no model, no KV cache.

Shape legend: R requests, B requests in a micro-batch, N trace tokens, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from moe_infer.errors import ConfigError
from moe_infer.serving.signatures import PredictedRouting, RecentRouting, SignatureSource

SCHEDULERS = ("expert", "fcfs")


def expected_experts(signatures: np.ndarray) -> float:
    """Expected distinct experts (summed over layers) a micro-batch of requests with these
    signatures [B, L, E] activates, if their experts are drawn independently."""
    if len(signatures) == 0:
        return 0.0
    return float((1.0 - np.prod(1.0 - signatures, axis=0)).sum())


def partition(signatures: np.ndarray, max_batch_size: int, *, sweeps: int = 4) -> list[list[int]]:
    """Split requests with signatures [R, L, E] into ceil(R / max_batch_size) micro-batches of at most
    ``max_batch_size`` that together expect few distinct experts: greedy (a group is seeded with the
    most confident remaining request and filled with the requests that add the fewest expected
    experts), then swaps and moves between groups while they lower the total. Returns lists of row
    indices; deterministic."""
    count = len(signatures)
    if count == 0:
        return []
    flat = signatures.reshape(count, -1)  # [R, L*E]
    groups: list[list[int]] = []
    remaining = list(range(count))
    while remaining:
        # seed: the most confident remaining request (largest squared mass); then the requests that
        # add the fewest expected experts, until the group is full
        seed = max(remaining, key=lambda row: (float((flat[row] ** 2).sum()), -row))
        group, miss = [seed], 1.0 - flat[seed]  # miss: prod over members of (1 - s)
        remaining.remove(seed)
        size = max_batch_size
        while remaining and len(group) < size:
            added = miss @ flat[remaining].T  # [len(remaining)]: cost increase of each candidate
            row = remaining[int(np.argmin(added))]
            group.append(row)
            miss = miss * (1.0 - flat[row])
            remaining.remove(row)
        groups.append(group)

    keep = 1.0 - flat  # [R, L*E]: probability each request leaves each expert unused
    width = flat.shape[1]

    def without_each(members: list[int]) -> np.ndarray:
        """[len(members), L*E]: prod of keep over the other members (prefix x suffix products)."""
        rows = keep[members]
        prefix = np.cumprod(np.vstack([np.ones(width), rows[:-1]]), axis=0)
        suffix = np.cumprod(np.vstack([rows[1:], np.ones(width)])[::-1], axis=0)[::-1]
        return prefix * suffix

    def improve() -> bool:
        """Apply the best swap (or move into a group with room) between the first pair of groups
        where one lowers the total."""
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ga, gb = groups[a], groups[b]
                wa, wb = without_each(ga), without_each(gb)  # [Ba, LE], [Bb, LE]
                cost_now = 2 * width - np.prod(keep[ga], axis=0).sum() - np.prod(keep[gb], axis=0).sum()
                # swap i of a with j of b: [Ba, Bb]
                swap = (2 * width - (wa[:, None, :] * keep[gb][None, :, :]).sum(-1)
                        - (wb[None, :, :] * keep[ga][:, None, :]).sum(-1)) - cost_now
                best, change = float(swap.min()), ("swap",) + np.unravel_index(int(swap.argmin()), swap.shape)
                if len(gb) < max_batch_size and len(ga) > 1:  # move i from a to b
                    move = (2 * width - wa.sum(-1) - (np.prod(keep[gb], axis=0)[None] * keep[ga]).sum(-1)) - cost_now
                    if move.min() < best:
                        best, change = float(move.min()), ("a->b", int(move.argmin()))
                if len(ga) < max_batch_size and len(gb) > 1:  # move j from b to a
                    move = (2 * width - wb.sum(-1) - (np.prod(keep[ga], axis=0)[None] * keep[gb]).sum(-1)) - cost_now
                    if move.min() < best:
                        best, change = float(move.min()), ("b->a", int(move.argmin()))
                if best < -1e-9:
                    if change[0] == "swap":
                        i, j = int(change[1]), int(change[2])
                        ga[i], gb[j] = gb[j], ga[i]
                    elif change[0] == "a->b":
                        gb.append(ga.pop(change[1]))
                    else:
                        ga.append(gb.pop(change[1]))
                    return True
        return False

    for _ in range(sweeps * count):
        if not improve():
            break
    return [sorted(g) for g in groups if g]


class GroupPlanner:
    """Decides the micro-batches of each round from request ids and signatures alone (shared by
    `generate_many` and the trace-driven `simulate_schedule`)."""

    def __init__(self, scheduler: str, max_batch_size: int, regroup_threshold: float = 1.0,
                 regroup_interval: int = 1):
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler={scheduler!r}: allowed values are {', '.join(map(repr, SCHEDULERS))}")
        check_int("max_batch_size", max_batch_size, 1)
        if not (isinstance(regroup_threshold, (int, float)) and regroup_threshold >= 0):
            raise ConfigError(f"regroup_threshold={regroup_threshold!r}: expected a number >= 0")
        check_int("regroup_interval", regroup_interval, 1)
        self.scheduler, self.max_batch_size, self.regroup_threshold = scheduler, max_batch_size, float(regroup_threshold)
        self.regroup_interval = regroup_interval
        self._rounds = 0

    def next_groups(self, current: list[list[int]], admitted: list[int],
                    signature: Callable[[int], np.ndarray]) -> tuple[list[list[int]], bool]:
        """(groups of the next round, whether the pool was regrouped). ``current``: the groups of the
        last round without their finished requests; ``admitted``: new requests, in arrival order."""
        current = [list(g) for g in current if g]
        if self.scheduler == "fcfs":
            # fill the earliest micro-batches with room, in admission order; never regroup
            for group in current:
                room = self.max_batch_size - len(group)
                group.extend(admitted[:room])
                admitted = admitted[room:]
            for start in range(0, len(admitted), self.max_batch_size):
                current.append(admitted[start:start + self.max_batch_size])
            return current, False
        pool = [i for g in current for i in g] + list(admitted)
        if not pool:
            return [], False
        self._rounds += 1
        signatures = np.stack([signature(i) for i in pool])  # [R, L, E]
        row_of = {request: row for row, request in enumerate(pool)}

        def total(groups: list[list[int]]) -> float:
            return sum(expected_experts(signatures[[row_of[i] for i in g]]) for g in groups)

        # the current grouping with each new request where it adds least (or in a new group)
        kept = [list(g) for g in current]
        for request in admitted:
            options = [i for i, g in enumerate(kept) if len(g) < self.max_batch_size]
            if not options:
                kept.append([request])
                continue
            costs = [total([kept[i] + [request]]) - total([kept[i]]) for i in options]
            kept[options[int(np.argmin(costs))]].append(request)
        needed = math.ceil(len(pool) / self.max_batch_size)
        if current and len(kept) == needed and (self._rounds - 1) % self.regroup_interval:
            return kept, False  # not a round where regrouping is considered
        proposal = [[pool[row] for row in rows] for rows in partition(signatures, self.max_batch_size)]
        if not current:
            return proposal, False
        if len(kept) > len(proposal):
            return proposal, True  # the current grouping needs more micro-batches than the pool does
        if total(kept) - total(proposal) >= self.regroup_threshold * len(proposal):
            return proposal, True
        return kept, False


@dataclass
class SchedulerStats:
    """What a run did. Expert counts are measured on the real routing of every forward pass."""

    scheduler: str = ""
    signatures: str = ""  # where the expert scheduler's signatures came from
    requests: int = 0
    rounds: int = 0
    micro_batches: int = 0  # decode forward passes
    decode_tokens: int = 0
    prefill_tokens: int = 0
    distinct_experts: float = 0.0  # sum over decode micro-batches of distinct experts per MoE layer, averaged over layers
    regroups: int = 0
    kv_bytes_moved: int = 0  # KV cache bytes copied to form, regroup and shrink micro-batches
    max_wait_rounds: int = 0  # rounds a request spent queued before admission
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        batches = max(self.micro_batches, 1)
        return {
            "scheduler": self.scheduler,
            "signatures": self.signatures,
            "requests": self.requests,
            "micro_batches": self.micro_batches,
            "mean_batch_size": self.decode_tokens / batches,
            "distinct_experts_per_micro_batch": self.distinct_experts / batches,
            "regroups": self.regroups,
            "kv_bytes_moved": self.kv_bytes_moved,
            "max_wait_rounds": self.max_wait_rounds,
            "tokens_per_second": (self.decode_tokens + self.requests) / self.seconds if self.seconds else 0.0,
            "seconds": self.seconds,
        }


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an int >= {minimum}")


def simulate_schedule(trace, *, max_batch_size: int, scheduler: str, pool_size: int | None = None,
                      prompt_tokens: int = 16, decode_tokens: int | None = None,
                      signatures: SignatureSource | None = None, regroup_threshold: float = 1.0,
                      regroup_interval: int = 1, order: Sequence[int] | None = None, lookahead: bool = False,
                      next_token_scores: np.ndarray | None = None) -> dict[str, float]:
    """Replay a trace's sequences as requests through the scheduler, without a model.

    Each sequence is a request: its first ``prompt_tokens`` tokens are the prompt (observed at
    admission), the next ``decode_tokens`` (default: all the rest) are decode steps whose routing
    is the trace's. Requests arrive in ``order`` (sequence positions in the trace; default: stored
    order) and are admitted first come first served into a pool of ``pool_size``; each round every
    pooled request decodes one token in the micro-batches the planner forms. Returns the mean
    distinct experts per micro-batch (per MoE layer), micro-batches, regroups and requests moved.
    The signature source sees expert ids (``hidden`` is None) and the trace's token ids
    (``extend``: the prompt and first decode token at admission, each next token after a step), so
    a `PredictedRouting` source predicts each request's next token from its own token window.

    ``next_token_scores`` float [N, L, E] replaces the signature source by a prediction of each
    token's routing made before its forward pass, e.g. a predictor's
    ``predict_trace(trace, distance=trace.num_layers)`` (scores known before the first MoE layer
    of the token): a request's signature is then the top-K experts of its next token's scores.
    ``lookahead=True`` uses the trace's own routing instead: the bound a perfect predictor (exact
    pre-gating, as Read-ME's decoupled router provides) would reach.
    """
    from types import SimpleNamespace

    check_int("max_batch_size", max_batch_size, 1)
    pool_size = 4 * max_batch_size if pool_size is None else pool_size
    check_int("pool_size", pool_size, 1)
    check_int("prompt_tokens", prompt_tokens, 1)
    planner = GroupPlanner(scheduler, max_batch_size, regroup_threshold, regroup_interval)
    source = signatures or RecentRouting(trace.num_layers, trace.num_experts)
    if isinstance(source, PredictedRouting):
        source.predictor.check_trace(trace)  # PredictorMismatch for another model's trace
    ids = trace.expert_ids  # [N, L, K]
    token_ids = trace.token_ids.numpy().astype(np.int64).tolist()  # [N]
    spans = [span for _, span in trace.sequences()]
    spans = [spans[i] for i in order] if order is not None else spans
    requests = {}  # request id -> (first decode token index, end index)
    for request_id, span in enumerate(spans):
        start = span.start + prompt_tokens
        end = span.stop if decode_tokens is None else min(span.stop, start + decode_tokens)
        if start < end:
            requests[request_id] = (span.start, start, end)

    def observe(request_ids: list[int], token_index: list[int]) -> None:
        for layer in range(trace.num_layers):
            source.observe(request_ids, layer, None, SimpleNamespace(expert_ids=ids[token_index, layer]))

    queue = deque(requests)
    cursor: dict[int, int] = {}

    if next_token_scores is not None:
        expected = (trace.num_tokens, trace.num_layers, trace.num_experts)
        if np.shape(next_token_scores) != expected:
            raise ConfigError(f"next_token_scores must be [N, L, E] = {list(expected)}, got {list(np.shape(next_token_scores))}")
        # the top-K experts of each prediction (any score scale)
        predicted_ids = np.argsort(-np.asarray(next_token_scores), axis=2, kind="stable")[:, :, :trace.top_k]
    else:
        predicted_ids = ids.numpy().astype(np.int64) if lookahead else None

    def next_token_routing(request_id: int) -> np.ndarray:
        one_hot = np.zeros((trace.num_layers, trace.num_experts))
        np.put_along_axis(one_hot, predicted_ids[cursor[request_id]], 1.0, axis=1)
        return one_hot

    groups: list[list[int]] = []
    distinct, batches, regroups, moved = 0.0, 0, 0, 0
    while queue or groups:
        admitted = []
        while queue and sum(map(len, groups)) + len(admitted) < pool_size:
            request_id = queue.popleft()
            first, start, _ = requests[request_id]
            source.extend(request_id, token_ids[first:start + 1])  # the prompt and the first decode input
            observe([request_id] * (start - first), list(range(first, start)))
            cursor[request_id] = start
            admitted.append(request_id)
        before = {i: frozenset(g) for g in groups for i in g}
        signature = source.signature if predicted_ids is None else next_token_routing
        groups, regrouped = planner.next_groups(groups, admitted, signature)
        regroups += int(regrouped)
        if regrouped:  # a pooled request moves when the set of its old group members changes
            after = {i: frozenset(g) & set(before) for g in groups for i in g}
            moved += sum(1 for i, members in before.items() if after[i] != members)
        for group in groups:
            tokens = [cursor[i] for i in group]
            distinct += float(np.mean([len(np.unique(ids[tokens, layer].numpy())) for layer in range(trace.num_layers)]))
            batches += 1
            observe(group, tokens)
            for i in group:
                cursor[i] += 1
                if cursor[i] < requests[i][2]:
                    source.extend(i, token_ids[cursor[i]:cursor[i] + 1])
        groups = [[i for i in g if cursor[i] < requests[i][2]] for g in groups]
        groups = [g for g in groups if g]
    for request_id in requests:
        source.forget(request_id)
    return {"scheduler": scheduler, "max_batch_size": max_batch_size, "pool_size": pool_size,
            "requests": len(requests), "micro_batches": batches,
            "distinct_experts_per_micro_batch": distinct / max(batches, 1), "regroups": regroups,
            "requests_moved": moved}
