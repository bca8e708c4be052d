"""Eviction policies of the expert cache, shared by the runtime cache and the simulator.

A policy sees the stream of uses of cache keys (`(layer_idx, expert)` at runtime, `(l, e)` with
l a MoE-layer position in the simulator) and, when an entry must go, picks the victim among the
resident keys the caller may evict (entries in use or being loaded are never offered). A policy
may also refuse to admit a key (`admit`), in which case the caller computes it from a transient
copy and keeps the cache as it is (the `static` policy's hot set, `belady`'s bypass).

Registry: `POLICIES` (name -> class); `make_policy(name, **options)` raises `ValueError` naming
the valid names. `belady` needs the future and lives here only for the simulator, which sets
its `next_use` oracle.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Hashable, Iterable
from moe_infer.errors import ConfigError

Key = Hashable


class Policy(ABC):
    name = "base"

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}

    def access(self, key: Key) -> None:
        """Record a use of `key` (a hit, or a miss that is being served)."""
        self.clock += 1
        self.last_use[key] = self.clock

    def admit(self, key: Key, candidates: list[Key]) -> bool:
        """Whether a missed `key` should enter a full cache by evicting one of `candidates` (else it
        is used once from a transient copy and dropped)."""
        return True

    def inserted(self, key: Key) -> None:
        """`key` entered the cache ahead of its use (a prefetch): it counts as recently used."""
        self.clock += 1
        self.last_use[key] = self.clock

    def removed(self, key: Key) -> None:
        """`key` left the cache."""

    def worth_evicting(self, victim: Key, key: Key) -> bool:
        """Whether a prefetch of `key` may evict `victim` (a guess must not push out a better one)."""
        return True

    def may_evict_for_use(self, victim: Key, key: Key) -> bool:
        """Whether a load of `key`, needed by a forward, may evict `victim`."""
        return True

    @abstractmethod
    def victim(self, candidates: list[Key]) -> Key:
        """The key to evict among `candidates` (non-empty, all resident and evictable)."""

    def victim_for(self, key: Key, candidates: list[Key], resident: list[Key]) -> Key:
        """The key to evict to make room for `key`; `resident` is every key in the cache (some
        not evictable). Policies that apportion room between layers look at it."""
        return self.victim(candidates)

    def _oldest(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: self.last_use.get(k, 0))


class LRUPolicy(Policy):
    """Least recently used."""

    name = "lru"

    def victim(self, candidates: list[Key]) -> Key:
        return self._oldest(candidates)


class LFUPolicy(Policy):
    """Least frequently used; counts survive eviction (an expert's popularity is a property of the
    expert, not of its stay in the cache); ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[Key, int] = {}

    def access(self, key: Key) -> None:
        super().access(key)
        self.counts[key] = self.counts.get(key, 0) + 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.counts.get(k, 0), self.last_use.get(k, 0)))


class StaticPolicy(Policy):
    """A pinned hot set (e.g. the most popular experts of a trace, Fiddler-style): hot keys are
    admitted and never evicted while another candidate exists; other keys are admitted only into
    room the hot set does not need (evicted least recently used first)."""

    name = "static"

    def __init__(self, hot: Iterable[Key] = ()) -> None:
        super().__init__()
        self.hot = set(hot)

    def set_hot(self, hot: Iterable[Key]) -> None:
        self.hot = set(hot)

    def victim(self, candidates: list[Key]) -> Key:
        cold = [k for k in candidates if k not in self.hot]
        return self._oldest(cold or candidates)

    def worth_evicting(self, victim: Key, key: Key) -> bool:
        return key in self.hot or victim not in self.hot

    def may_evict_for_use(self, victim: Key, key: Key) -> bool:
        # the runtime keeps one expert of room outside the hot set: a cold expert waits for it
        return self.worth_evicting(victim, key)

    def admit(self, key: Key, candidates: list[Key]) -> bool:
        if key in self.hot or not self.hot:
            return True
        # a cold key may only take a slot from another cold key: never push out the hot set
        return any(k not in self.hot for k in candidates)


class ExpertFlowPolicy(Policy):
    """Slots apportioned by predicted need: every key carries the latest predicted score of its
    expert for the upcoming use of its layer (set by `predict`); the victim is the key with the
    lowest score, least recently used first among equals. A layer whose experts are predicted
    needed keeps more slots; a mispredicted expert is loaded on demand (at top priority by the
    loader) and a new prediction for a layer replaces the stale one."""

    name = "expertflow"

    def __init__(self) -> None:
        super().__init__()
        self.scores: dict[Key, float] = {}
        self._layer_keys: dict[Hashable, set[Key]] = {}

    def predict(self, layer: Hashable, scores: dict[Key, float]) -> None:
        """Replace the predictions of `layer` by `scores` (key -> score, higher = more likely)."""
        for key in self._layer_keys.pop(layer, ()):
            self.scores.pop(key, None)
        self.scores.update(scores)
        self._layer_keys[layer] = set(scores)

    def access(self, key: Key) -> None:
        super().access(key)
        # a prediction is consumed by the use it predicted; it no longer protects the key
        self.scores.pop(key, None)

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.scores.get(k, -math.inf), self.last_use.get(k, 0)))

    def need(self, layer: Hashable) -> float:
        """Predicted need of a layer: 1 + the scores of its latest prediction (clipped at 0)."""
        return 1.0 + sum(max(self.scores.get(k, 0.0), 0.0) for k in self._layer_keys.get(layer, ()))

    def victim_for(self, key: Key, candidates: list[Key], resident: list[Key]) -> Key:
        """Evict from the layer that holds the most slots beyond its share, the share of each layer
        being proportional to its predicted need (equal shares without predictions)."""
        occupancy: dict[Hashable, int] = {}
        for k in [*resident, key]:
            occupancy[k[0]] = occupancy.get(k[0], 0) + 1
        layers = {k[0] for k in candidates}
        total_need = sum(self.need(layer) for layer in occupancy)
        slots = len(resident)

        def excess(layer: Hashable) -> float:
            return occupancy[layer] - slots * self.need(layer) / total_need

        worst = max(layers, key=excess)
        return self.victim([k for k in candidates if k[0] == worst])

    def worth_evicting(self, victim: Key, key: Key) -> bool:
        return self.scores.get(victim, -math.inf) < self.scores.get(key, -math.inf)


class BeladyPolicy(Policy):
    """Offline optimum (simulator only): evict the key whose next use is farthest ahead, and do not
    admit a missed key whose next use is farther than every resident's (bypass). `next_use(key)`
    is set by the simulator: the time of the key's next use after the current one (inf: never)."""

    name = "belady"

    def __init__(self) -> None:
        super().__init__()
        self.next_use: Callable[[Key], float] = lambda key: math.inf

    def victim(self, candidates: list[Key]) -> Key:
        return max(candidates, key=self.next_use)

    def admit(self, key: Key, candidates: list[Key]) -> bool:
        return self.next_use(key) < max(self.next_use(k) for k in candidates)


class RingPolicy(Policy):
    """The SE-MoE ring (runtime, `loader="ring"`): layers form a cycle in execution order; the
    victim is an expert of the layer whose next turn is farthest away (the one that just computed:
    its section is overwritten next), least recently used first within it."""

    name = "ring"

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.position = {layer: i for i, layer in enumerate(order)}
        self.current = order[0]

    def distance(self, key: Key) -> int:
        return (self.position[key[0]] - self.position[self.current]) % len(self.position)

    def victim(self, candidates: list[Key]) -> Key:
        return max(candidates, key=lambda k: (self.distance(k), -self.last_use.get(k, 0)))

    def worth_evicting(self, victim: Key, key: Key) -> bool:
        return self.distance(victim) > self.distance(key)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, StaticPolicy, ExpertFlowPolicy, BeladyPolicy)
}
RUNTIME_POLICIES = ("lru", "lfu", "static", "expertflow")


def make_policy(name: str, **options) -> Policy:
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; valid policies are {', '.join(map(repr, POLICIES))}")
    return POLICIES[name](**options)
