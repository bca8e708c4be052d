"""Trace-driven cache simulator: `simulate(trace, policy, capacity, ...)`.

Semantics: one cache lives for the whole trace; accesses are replayed token by token in trace
order, MoE layer by MoE layer, the K experts of a token in order. An expert the current token
needs at the current layer is never evicted for another expert of the same token and layer.
`capacity` counts expert slots per MoE layer (`per_layer=True`) or in total. A miss loads the
expert; when the cache is full the policy picks a victim or refuses the expert (it is then used
once and dropped: a bypass, still a load). `belady` evicts the resident expert whose next use is
farthest ahead and bypasses an expert whose next use is farther than every resident's.

With a `predictor` (`predict_trace(trace, distance) -> [N, L, E]` scores), the top-K predicted
experts of token n at layer l are prefetched `prefetch_depth` layers earlier (at the start of
the token for the first layers); a prefetch never evicts an expert the current token needs, nor
one with a higher predicted score. Prefetched experts count as hits when used; `loads` counts
every expert brought in (misses + prefetches). `belady` (demand only) has the highest hit rate of
every demand policy and the fewest loads of every policy, prefetching or not.

Bytes: with `expert_bytes` (bytes of one expert as the cache holds it), `bytes_loaded` is loads x
that. For quantized experts it is their quantized size (packed weights, scales, zero points,
biases: what a cache slot of that format holds and a load moves); `checkpoint_expert_bytes` reads
it off a converted checkpoint, as stored or as it would be stored with `--quantize`, and
`capacity_for_budget` turns a byte budget into expert slots, so the same budget holds more
quantized experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moe_infer.traces.popularity import hot_set
from moe_infer.traces.trace import Trace

from .policies import POLICIES, BeladyPolicy, ExpertFlowPolicy, Policy, StaticPolicy, make_policy
from moe_infer.errors import ConfigError


@dataclass
class SimResult:
    policy: str
    capacity: int
    per_layer_capacity: bool
    accesses: int
    hits: int
    misses: int
    bypasses: int  # misses that did not enter the cache
    prefetches_issued: int = 0
    prefetches_used: int = 0
    prefetches_wasted: int = 0  # evicted before use, or never used by the end of the trace
    per_layer: list[float] = field(default_factory=list)  # hit rate per MoE-layer position
    expert_bytes: int | None = None  # bytes of one expert as cached (quantized bytes for quantized experts)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def loads(self) -> int:
        """Experts brought into the cache or used from a transient copy (bytes moved / expert size)."""
        return self.misses + self.prefetches_issued

    @property
    def bytes_loaded(self) -> int | None:
        """Bytes the loads move (None without `expert_bytes`)."""
        return None if self.expert_bytes is None else self.loads * self.expert_bytes

    def as_dict(self) -> dict:
        return {"policy": self.policy, "capacity": self.capacity, "per_layer": self.per_layer_capacity,
                "accesses": self.accesses, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "bypasses": self.bypasses, "loads": self.loads, "expert_bytes": self.expert_bytes,
                "bytes_loaded": self.bytes_loaded, "prefetches_issued": self.prefetches_issued,
                "prefetches_used": self.prefetches_used, "prefetches_wasted": self.prefetches_wasted,
                "per_layer_hit_rate": self.per_layer}


class TraceOracle:
    """A predictor that replays the trace itself: the experts each token really uses score 1, the
    others 0. With `noise` p, each (token, layer) prediction is replaced, with probability p, by
    uniform random scores (a predictor that is wrong that often). p = 0: perfect predictions, an
    upper bound for any real predictor. For tests and comparisons."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"oracle noise={noise!r}: expected a probability in [0, 1]")
        self.noise, self.seed = noise, seed

    def predict_trace(self, trace: Trace, distance: int) -> np.ndarray:
        ids = trace.expert_ids.numpy().astype(np.int64)
        scores = np.zeros((*ids.shape[:2], trace.num_experts), np.float32)
        np.put_along_axis(scores, ids, 1.0, axis=2)
        if self.noise:
            rng = np.random.default_rng(self.seed)
            wrong = rng.random(ids.shape[:2]) < self.noise  # [N, L]
            scores[wrong] = rng.random((int(wrong.sum()), trace.num_experts)).astype(np.float32)
        return scores


def format_table(results: list[SimResult]) -> str:
    """Markdown table of simulator results (with a bytes column when they know an expert's bytes)."""
    with_bytes = any(r.expert_bytes is not None for r in results)
    extra = (" bytes loaded |", "---|") if with_bytes else ("", "")
    lines = [f"| policy | capacity | hit rate | hits | misses | loads |{extra[0]} prefetch issued / used / wasted |",
             f"|---|---|---|---|---|---|{extra[1]}---|"]
    for r in results:
        scope = "per layer" if r.per_layer_capacity else "total"
        loaded = (f" {'n/a' if r.bytes_loaded is None else f'{r.bytes_loaded:,}'} |" if with_bytes else "")
        lines.append(f"| {r.policy} | {r.capacity} {scope} | {r.hit_rate:.3f} | {r.hits} | {r.misses} | {r.loads} |"
                     f"{loaded} {r.prefetches_issued} / {r.prefetches_used} / {r.prefetches_wasted} |")
    return "\n".join(lines) + "\n"


def checkpoint_expert_bytes(path, quantize=None) -> int:
    """Bytes of one routed expert of the converted checkpoint at `path` as a cache holds it: as stored
    (quantized bytes when it was converted with `--quantize`), or, with `quantize` (a scheme name or
    `QuantScheme`), as `convert --quantize` would store it (its tensors' sizes from `part_specs`,
    biases in the store's dtype). Every MoE layer of the supported families has the same size; the
    largest is returned."""
    from moe_infer.experts.quant import QuantScheme, part_specs
    from moe_infer.experts.store import ExpertStore

    scheme = QuantScheme(quantize) if isinstance(quantize, str) else quantize
    with ExpertStore.open(path, checksums="off") as store:
        stored = store.quant_scheme
        if scheme is None or scheme == stored:
            return max(store.expert_nbytes(l) for l in store.moe_layers)
        if stored is not None:
            raise ConfigError(f"quantize={scheme.name!r}: {path} holds experts quantized to {stored.name} "
                              f"(group {stored.group_size}); give no quantize to count them as stored")
        sizes = []
        for layer in store.moe_layers:
            layout = store.layout(layer)
            h, i = layout.hidden_size, layout.intermediate_size
            specs = [*part_specs(scheme, 2 * i, h).values(), *part_specs(scheme, h, i).values()]
            weights = sum(dtype.itemsize * math.prod(shape) for dtype, shape in specs)
            biases = sum(store.dtype.itemsize * math.prod(shape) for kind, _, shape, _ in layout.parts
                         if kind in ("b13", "b2"))
            sizes.append(weights + biases)
        return max(sizes)


def capacity_for_budget(budget_bytes: int, expert_bytes: int) -> int:
    """Expert slots a byte budget holds (at least one, or refused)."""
    slots = int(budget_bytes) // int(expert_bytes)
    if slots < 1:
        raise ConfigError(f"a budget of {budget_bytes} bytes holds no expert of {expert_bytes} bytes; give at "
                          f"least {expert_bytes}")
    return slots


def _next_use_times(keys: np.ndarray) -> np.ndarray:
    """For each access i of the flat key sequence, the index of the next access of the same key (inf: none)."""
    nxt = np.full(len(keys), math.inf)
    last: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        k = int(keys[i])
        if k in last:
            nxt[i] = last[k]
        last[k] = i
    return nxt


def _check(trace: Trace, policy: str, capacity: int, predictor, prefetch_depth: int) -> None:
    if not isinstance(trace, Trace):
        raise TypeError(f"simulate expects a moe_infer.Trace, got {type(trace).__name__}")
    if policy not in POLICIES:
        raise ConfigError(f"unknown cache policy {policy!r}; valid policies are {', '.join(map(repr, POLICIES))}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"capacity={capacity!r}: expected an int >= 1 (expert slots)")
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise ConfigError(f"prefetch_depth={prefetch_depth!r}: expected an int >= 1 (MoE layers ahead)")
    if policy == "expertflow" and predictor is None:
        raise ConfigError("policy 'expertflow' needs predictor= (an object with predict_trace(trace, distance))")
    if policy == "belady" and predictor is not None:
        raise ConfigError("belady is the demand-only optimum; it takes no predictor")
    if predictor is not None and not callable(getattr(predictor, "predict_trace", None)):
        raise TypeError(f"predictor must have predict_trace(trace, distance); got {type(predictor).__name__}")


class _Sim:
    """The replay state: one pool of resident keys per capacity group."""

    def __init__(self, policy: Policy, capacity: int, per_layer: bool, num_layers: int):
        self.policy = policy
        self.capacity = capacity
        self.per_layer = per_layer
        self.pools: list[set] = [set() for _ in range(num_layers if per_layer else 1)]
        self.prefetched: set = set()  # resident keys brought in by a prefetch and not used yet
        self.wasted = 0

    def pool(self, key) -> set:
        return self.pools[key[0] if self.per_layer else 0]

    def make_room(self, key, protected: set, *, prefetch: bool = False) -> bool:
        """Evict one entry if `key`'s pool is full; False if `key` must not enter."""
        pool = self.pool(key)
        if len(pool) < self.capacity:
            return True
        candidates = [k for k in pool if k not in protected]
        if not candidates:
            return False
        if not prefetch:
            if not self.policy.admit(key, candidates):
                return False
        victim = self.policy.victim_for(key, candidates, list(pool))
        if prefetch and not self.policy.worth_evicting(victim, key):
            return False
        pool.discard(victim)
        self.policy.removed(victim)
        if victim in self.prefetched:
            self.prefetched.discard(victim)
            self.wasted += 1
        return True


def simulate(trace: Trace, policy: str, capacity: int, *, per_layer: bool = True, predictor=None,
             prefetch_depth: int = 1, hot_from: Trace | None = None, expert_bytes: int | None = None) -> SimResult:
    """Replay `trace` through a cache of `capacity` expert slots run by `policy` (see the module
    docstring). `static` pins the most used experts of `hot_from` (default: the trace itself).
    `expert_bytes`: bytes of one expert as cached (quantized bytes for quantized experts), for
    `SimResult.bytes_loaded`."""
    _check(trace, policy, capacity, predictor, prefetch_depth)
    if expert_bytes is not None and (isinstance(expert_bytes, bool) or not isinstance(expert_bytes, int)
                                     or expert_bytes < 1):
        raise ConfigError(f"expert_bytes={expert_bytes!r}: expected a positive int (bytes of one expert)")
    ids = trace.expert_ids.numpy().astype(np.int64)  # [N, L, K]
    num_tokens, num_layers, top_k = ids.shape
    num_experts = trace.num_experts
    pol = make_policy(policy)
    if isinstance(pol, StaticPolicy):
        source = hot_from if hot_from is not None else trace
        chosen = hot_set(source, capacity, per_layer=per_layer)  # the static hot set (moe_infer.traces.popularity)
        pol.set_hot({(pos, e) for pos, layer in enumerate(source.moe_layers) for e in chosen[layer]})
    flat_keys = (ids + (np.arange(num_layers) * num_experts)[None, :, None]).reshape(-1)
    next_use = _next_use_times(flat_keys) if isinstance(pol, BeladyPolicy) else None
    upcoming: dict = {}  # belady: key -> time of its next use
    if isinstance(pol, BeladyPolicy):
        pol.next_use = lambda key: upcoming.get(key, math.inf)
    scores = None
    if predictor is not None:
        scores = np.asarray(predictor.predict_trace(trace, prefetch_depth), dtype=np.float32)
        if scores.shape != (num_tokens, num_layers, num_experts):
            raise ConfigError(f"predictor.predict_trace returned shape {scores.shape}; expected "
                             f"{(num_tokens, num_layers, num_experts)} [N, L, E]")

    sim = _Sim(pol, capacity, per_layer, num_layers)
    hits = misses = bypasses = issued = used = 0
    layer_hits = np.zeros(num_layers, dtype=np.int64)

    def prefetch(n: int, l: int, protected: set) -> None:
        nonlocal issued
        row = scores[n, l]
        top = np.argsort(-row, kind="stable")[:top_k]
        predicted = {(l, int(e)): float(row[e]) for e in top}
        if isinstance(pol, ExpertFlowPolicy):
            pol.predict(l, predicted)
        keep = protected | set(predicted)
        for key in predicted:
            if key in sim.pool(key):
                continue
            if sim.make_room(key, keep, prefetch=True):
                sim.pool(key).add(key)
                pol.inserted(key)
                sim.prefetched.add(key)
                issued += 1

    t = 0
    for n in range(num_tokens):
        if scores is not None:
            for l in range(min(prefetch_depth, num_layers)):
                prefetch(n, l, set())
        for l in range(num_layers):
            needed = {(l, int(e)) for e in ids[n, l]}
            for k in range(top_k):
                key = (l, int(ids[n, l, k]))
                if next_use is not None:
                    upcoming[key] = next_use[t]
                if key in sim.pool(key):
                    hits += 1
                    layer_hits[l] += 1
                    if key in sim.prefetched:
                        sim.prefetched.discard(key)
                        used += 1
                else:
                    misses += 1
                    if sim.make_room(key, needed):
                        sim.pool(key).add(key)
                    else:
                        bypasses += 1
                pol.access(key)
                t += 1
            if scores is not None and l + prefetch_depth < num_layers:
                prefetch(n, l + prefetch_depth, set())
    wasted = sim.wasted + len(sim.prefetched)
    per_layer_rates = (layer_hits / max(num_tokens * top_k, 1)).tolist()
    return SimResult(policy, capacity, per_layer, num_tokens * num_layers * top_k, hits, misses, bypasses,
                     issued, used, wasted, per_layer_rates, expert_bytes)
