"""Generation for many prompts with expert-aware micro-batching (`generate_many`).

This module owns the decode loop of a wrapped model over a list of requests: admission (first come,
first served, into a pool of at most ``pool_size`` requests), the partition of the pool into
micro-batches of at most ``max_batch_size`` requests, the per-request KV caches and how they are
stacked into and split out of micro-batches, and the scheduler statistics.
It does not route, cache or prefetch experts (the executor does) and it does not predict routing:
routing signatures come from a pluggable `SignatureSource`.

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

KV movement: a micro-batch holds one `DynamicCache` [B, heads, S, d] per attention layer. A finished
request's row is dropped with ``batch_select_indices``; a regrouped request's row is cut out of its
old micro-batch (its real tokens are the last ``n`` positions: padding is only ever on the left)
and stacked into the new one. Only full-attention ``DynamicLayer`` caches are supported (not
sliding-window or linear-attention layers).

Shape legend: B requests in a micro-batch, S cached positions, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from moe_infer.models import cache_argument, output_cache
from moe_infer.errors import ConfigError

SCHEDULERS = ("expert", "fcfs")


# ----------------------------------------------------------------------------- routing signatures

class SignatureSource(Protocol):
    """Where the scheduler gets each request's routing signature from.

    ``observe`` is called from the MoE layers' routing observers during every forward pass the
    scheduler runs: ``request_ids`` names the request of each row of ``hidden`` [T, H] (one row per
    token: a prompt's tokens during prefill, one token per request during decode), ``layer`` is
    the MoE-layer position (0..L-1) and ``routing`` the layer's `Routing` (``expert_ids`` [T, K]).
    ``signature`` returns float [L, E] in [0, 1]: how likely the request's next token uses each
    expert. ``extend`` is told every token of a request as soon as it is known, before the forward
    pass that routes it: the prompt at admission, then each chosen token (the next input). A
    predictor plugs in here: from token ids (`PredictedRouting`) or from observed hidden states.
    """

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None: ...

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None: ...

    def signature(self, request_id: int) -> np.ndarray: ...

    def forget(self, request_id: int) -> None: ...


class RecentRouting:
    """The default signature: the request's own recent routing, without any predictor.

    Consecutive tokens of one sequence reuse experts far more than chance, so the experts of the
    last tokens predict the next token's. Per request and layer, an exponential moving average of
    the one-hot routing of its tokens (``decay`` is the weight of the past at each token), starting
    from its prompt.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.5):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay!r}: expected a number in [0, 1)")
        self.num_layers, self.num_experts, self.decay = num_layers, num_experts, decay
        self._state: dict[int, np.ndarray] = {}  # request id -> [L, E]

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None:
        expert_ids = routing.expert_ids.detach().cpu().numpy().astype(np.int64)  # [T, K]
        start = 0
        while start < len(request_ids):  # runs of rows of one request: tokens in order
            end = start + 1
            while end < len(request_ids) and request_ids[end] == request_ids[start]:
                end += 1
            state = self._state.setdefault(request_ids[start], np.zeros((self.num_layers, self.num_experts)))
            # the last token weighs (1 - decay), the one before decay * (1 - decay), ...
            weights = (1.0 - self.decay) * self.decay ** np.arange(end - start - 1, -1, -1)  # [n]
            state[layer] *= self.decay ** (end - start)
            np.add.at(state[layer], expert_ids[start:end], weights[:, None])
            start = end

    def signature(self, request_id: int) -> np.ndarray:
        return self._state.get(request_id, np.zeros((self.num_layers, self.num_experts)))

    def forget(self, request_id: int) -> None:
        self._state.pop(request_id, None)

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None:
        pass  # routing only


class PredictedRouting:
    """Signatures predicted for each request's next token before its forward pass runs.

    ``predictor`` is a `moe_infer.predictors` predictor that can route a token before the first MoE
    layer: "pregate" (Read-ME's pre-gating router: ``scores(windows [T, W]) -> [T, L, E]``, token
    ids only) or "expertflow" (the routing-path predictor at its first source:
    ``first_layer_scores(windows, previous [T, L, K])``, token ids and the previous token's routing,
    observed through the MoE layers). Per request id it keeps the request's last ``window +
    lookahead`` token ids (and, for expertflow, its last token's experts); the signature is the
    predicted routing of the request's next input token (its last known token). State is per
    request, never per row: consecutive forward passes are different micro-batches. Scores are
    computed when a request's last token changes, in one predictor call for all such requests.
    """

    def __init__(self, predictor: Any):
        kind = getattr(predictor, "kind", type(predictor).__name__)
        self.uses_routing = callable(getattr(predictor, "first_layer_scores", None))
        if not (self.uses_routing or callable(getattr(predictor, "scores", None))) \
                or "window" not in getattr(predictor, "options", {}):
            raise ConfigError(f"PredictedRouting needs a predictor that routes a token before the first MoE layer "
                             f"(kind 'pregate' or 'expertflow'), got {kind!r}")
        self.predictor = predictor
        self.num_layers, self.num_experts = predictor.num_layers, predictor.num_experts
        self.width = int(predictor.options["window"])
        self.lookahead = int(predictor.options.get("lookahead", 0))
        self._tokens: dict[int, list[int]] = {}  # request id -> its last width + lookahead token ids
        self._previous: dict[int, np.ndarray] = {}  # request id -> [L, K] experts of its last routed token
        self._scores: dict[int, np.ndarray] = {}  # request id -> [L, E] for its current last token

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None:
        tokens = self._tokens.setdefault(request_id, [])
        tokens.extend(int(t) for t in token_ids)
        del tokens[:-(self.width + self.lookahead)]
        self._scores.pop(request_id, None)

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None:
        if not self.uses_routing:
            return  # pregate: token ids only, the backbone's routing is never read
        expert_ids = routing.expert_ids.detach().cpu().numpy().astype(np.int64)  # [T, K]
        last = {request: row for row, request in enumerate(request_ids)}  # each request's last token
        for request, row in last.items():
            previous = self._previous.setdefault(request, np.full((self.num_layers, expert_ids.shape[1]), -1))
            previous[layer] = expert_ids[row]
            self._scores.pop(request, None)

    def signature(self, request_id: int) -> np.ndarray:
        if request_id not in self._tokens:
            return np.zeros((self.num_layers, self.num_experts))
        if request_id not in self._scores:
            # one predictor call for every request whose last token changed (the planner asks for
            # the whole pool in a row)
            stale = [i for i in self._tokens if i not in self._scores]
            windows = []
            for i in stale:
                tokens = self._tokens[i]
                known = tokens[:len(tokens) - self.lookahead] if self.lookahead else tokens
                windows.append([-1] * (self.width - len(known)) + known[-self.width:])  # -1: before the start
            windows = torch.tensor(windows, dtype=torch.long)
            if self.uses_routing:
                top_k = self.predictor.top_k
                previous = np.stack([self._previous.get(i, np.full((self.num_layers, top_k), -1)) for i in stale])
                scores = self.predictor.first_layer_scores(windows, torch.from_numpy(previous))
            else:
                scores = self.predictor.scores(windows)  # [len(stale), L, E]
            for i, row in zip(stale, scores.float().cpu().numpy().astype(np.float64)):
                self._scores[i] = row
        return self._scores[request_id]

    def forget(self, request_id: int) -> None:
        self._tokens.pop(request_id, None)
        self._previous.pop(request_id, None)
        self._scores.pop(request_id, None)


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
        _check_int("max_batch_size", max_batch_size, 1)
        if not (isinstance(regroup_threshold, (int, float)) and regroup_threshold >= 0):
            raise ConfigError(f"regroup_threshold={regroup_threshold!r}: expected a number >= 0")
        _check_int("regroup_interval", regroup_interval, 1)
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


# ----------------------------------------------------------------------------- requests and micro-batches

@dataclass(eq=False)
class PooledRequest:
    """One request of a `DecodePool`: its prompt, token choices (`RequestSampler`) and KV cache."""

    index: int  # unique among the pool's requests (the signature source's request id)
    prompt: list[int]
    sampler: Any  # moe_infer.serving.sampling.RequestSampler
    tokens: list[int] = field(default_factory=list)  # generated so far
    cache: list[tuple[Tensor, Tensor]] | None = None  # per attention layer: keys, values [1, h, n, d]
    prefilled: int = 0  # prompt tokens in its own cache so far (chunked prefill)
    prefill_cache: Any = None  # its batch-1 DynamicCache while the prompt is going in
    done: bool = False

    @property
    def length(self) -> int:  # tokens in its KV cache once the last generated token is fed
        return len(self.prompt) + len(self.tokens) - 1


class _MicroBatch:
    """Requests decoded together and their stacked, left-padded KV cache."""

    def __init__(self, requests: list[PooledRequest], model: nn.Module, stats: SchedulerStats):
        self.requests = requests
        lengths = [r.length for r in requests]
        width = max(lengths)
        layers = []
        for layer_index in range(len(requests[0].cache)):
            keys = torch.cat([_left_pad(r.cache[layer_index][0], width) for r in requests])
            values = torch.cat([_left_pad(r.cache[layer_index][1], width) for r in requests])
            layers.append((keys, values))
            stats.kv_bytes_moved += keys.nbytes + values.nbytes  # the copy torch.cat made
        for r in requests:
            r.cache = None
        self.cache = _dynamic_cache(model, layers)
        device = layers[0][0].device
        self.mask = torch.zeros(len(requests), width, dtype=torch.long, device=device)  # [B, S]
        for row, length in enumerate(lengths):
            self.mask[row, width - length:] = 1

    def step(self, model: nn.Module) -> Tensor:
        """One decode step of every member: logits [B, V] of the next token. A step that raises leaves
        the micro-batch as it was (the layers it reached had appended a column: cut off again)."""
        device = self.mask.device
        width = self.mask.shape[1]
        input_ids = torch.tensor([[r.tokens[-1]] for r in self.requests], device=device)  # [B, 1]
        position_ids = torch.tensor([[r.length] for r in self.requests], device=device)  # [B, 1]
        mask = torch.cat([self.mask, torch.ones(len(self.requests), 1, dtype=self.mask.dtype, device=device)], 1)
        try:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        **cache_argument(model, self.cache), use_cache=True, logits_to_keep=1)
        except BaseException:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
            raise
        self.mask = mask
        return out.logits[:, -1, :].float()

    def keep(self, rows: list[int]) -> int:
        """Drop every other row; trim the columns that are padding in every remaining row. Returns the
        bytes of KV cache copied."""
        index = torch.tensor(rows, device=self.mask.device)
        self.requests = [self.requests[row] for row in rows]
        self.mask = self.mask[index]
        trim = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        copied = 0
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
            copied += layer.keys.nbytes + layer.values.nbytes
        self.mask = self.mask[:, trim:]
        return copied

    def release(self, rows: list[int]) -> tuple[list[PooledRequest], int]:
        """Hand the requests of ``rows`` their own caches back (real tokens only, as views: they are
        copied once, when stacked into their next micro-batch) and drop them. Returns them and the
        bytes copied to close the remaining rows up."""
        released = []
        for row in rows:
            request = self.requests[row]
            n = request.length
            request.cache = [(layer.keys[row:row + 1, :, -n:], layer.values[row:row + 1, :, -n:])
                             for layer in self.cache.layers]
            released.append(request)
        remaining = [row for row in range(len(self.requests)) if row not in set(rows)]
        copied = self.keep(remaining) if remaining else 0
        if not remaining:
            self.requests = []
        return released, copied


def _left_pad(tensor: Tensor, width: int) -> Tensor:
    """[1, h, n, d] -> [1, h, width, d], zeros on the left (masked out by the attention mask)."""
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3]), tensor], dim=2)


def _dynamic_cache(model: nn.Module, layers: list[tuple[Tensor, Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    _check_cache_layers(cache)
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.update(keys, values)
    return cache


def _check_cache_layers(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ConfigError(f"expert-aware batching (generate_many, moe-infer serve) supports models whose KV cache is "
                         f"made of full-attention DynamicLayer layers; this model's cache has {', '.join(sorted(kinds))}")


def check_model(model: nn.Module) -> None:
    """Refuse, before any work, a model the pool cannot batch: not wrapped, or with a KV cache that is
    not made of full-attention layers."""
    from moe_infer.api import is_wrapped
    from transformers import DynamicCache

    if not is_wrapped(model):
        raise ConfigError("expert-aware batching (generate_many, moe-infer serve) needs a wrapped model "
                         "(moe_infer.wrap(model)): the scheduler observes routing through the MoE layers")
    _check_cache_layers(DynamicCache(config=model.config))


def _cache_of(cache) -> list[tuple[Tensor, Tensor]]:
    _check_cache_layers(cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


# ----------------------------------------------------------------------------- the scheduler

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


def signature_source(model: nn.Module, scheduler: str, signatures: SignatureSource | None = None,
                     predictor: Any = None) -> SignatureSource:
    """The expert scheduler's signatures: ``signatures`` as given, else ``predictor`` (a "pregate" or
    "expertflow" predictor or its file: `PredictedRouting`), else the wrapped model's
    ``MoEConfig.predictor`` when it is such a predictor and the scheduler is "expert", else each
    request's recent routing."""
    from moe_infer.api import executor

    ex = executor(model)
    if predictor is not None and signatures is not None:
        raise ConfigError("give signatures or predictor, not both")
    if predictor is None and signatures is None and ex.predictor_hook is not None and scheduler == "expert":
        hooked = ex.predictor_hook.predictor  # MoEConfig.predictor, when it can route queued tokens
        predictor = hooked if hooked.kind in ("pregate", "expertflow") else None
    if predictor is not None:
        from moe_infer.predictors.runtime import checked_predictor

        return PredictedRouting(checked_predictor(ex, getattr(model.config, "_name_or_path", ""), predictor))
    return signatures or RecentRouting(len(ex.layers), ex.layers[0].num_experts)


def signature_name(scheduler: str, signatures: SignatureSource) -> str:
    if scheduler == "fcfs":
        return "none"
    if isinstance(signatures, PredictedRouting):
        return f"{signatures.predictor.kind} predictor"
    return "recent routing" if isinstance(signatures, RecentRouting) else type(signatures).__name__


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
        from moe_infer.api import executor

        self.model, self.planner, self.signatures, self.stats = model, planner, signatures, stats
        self.executor = executor(model)
        self.batches: list[_MicroBatch] = []
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
        request.cache, request.prefill_cache = _cache_of(request.prefill_cache), None
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

    def _run(self, batch: _MicroBatch, fail) -> list[tuple[_MicroBatch, Tensor | None]]:
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
        singles = [_MicroBatch([request], self.model, self.stats) for request in released]
        self.batches.remove(batch)
        self.batches.extend(singles)
        return [result for single in singles for result in self._run(single, fail)]

    def _step(self, batch: _MicroBatch) -> Tensor:
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

    def _drop(self, batch: _MicroBatch, keep: list[int]) -> None:
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

    def _apply(self, target: list[list[PooledRequest]]) -> list[_MicroBatch]:
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
                formed.append(_MicroBatch(group, self.model, stats))
            elif newcomers:
                released, _ = base.release(list(range(len(base.requests))))
                formed.append(_MicroBatch(released + newcomers, self.model, stats))
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
        from moe_infer.api import executor
        from moe_infer.serving.sampling import sampling_params

        check_model(model)  # before any work
        self.model = model
        self.executor = executor(model)
        _check_int("max_batch_size", max_batch_size, 1)
        self.max_batch_size = max_batch_size
        self.pool_size = 4 * max_batch_size if pool_size is None else pool_size
        _check_int("pool_size", self.pool_size, 1)
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
        from moe_infer.serving.sampling import RequestSampler

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
    from moe_infer.models import decode_tokens, encode_text

    as_text = bool(prompts) and all(isinstance(p, str) for p in prompts)
    token_prompts = [encode_text(tokenizer, p) for p in prompts] if as_text else prompts
    result = BatchGenerator(model, max_batch_size=max_batch_size, tokenizer=tokenizer, **options).run(token_prompts)
    outputs = [decode_tokens(tokenizer, t) for t in result.tokens] if as_text else result.tokens
    return (outputs, result.stats) if return_stats else outputs


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an int >= {minimum}")


# ----------------------------------------------------------------------------- trace-driven evaluation

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

    _check_int("max_batch_size", max_batch_size, 1)
    pool_size = 4 * max_batch_size if pool_size is None else pool_size
    _check_int("pool_size", pool_size, 1)
    _check_int("prompt_tokens", prompt_tokens, 1)
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
