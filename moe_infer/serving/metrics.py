"""The Prometheus series of the server's ``/metrics`` (text exposition format, `prometheus_client`).

Owns the series and their names; the engine thread feeds them (`moe_infer.serving.engine`), the
HTTP thread renders them (`prometheus_client` is thread safe). The expert cache's counters come
from `ModelExecutor.stats()`, read on the engine thread (the thread that drives the model) at most
every ``stats_interval`` seconds, and are exposed from that snapshot.

Series (all prefixed ``moe_infer_``): ``requests_running``, ``requests_waiting``,
``requests_total{outcome}`` (completed, cancelled, failed, rejected), ``prompt_tokens_total``,
``generation_tokens_total``, ``generation_tokens_per_second`` (over the last ``rate_window``
seconds), ``time_to_first_token_seconds`` and ``inter_token_latency_seconds`` (histograms),
``micro_batch_size`` and ``distinct_experts_per_micro_batch`` (histograms, one observation per
decode forward pass; distinct experts averaged over MoE layers), and per expert-cache tier
``expert_cache_hits_total``, ``expert_cache_misses_total``, ``expert_cache_hit_rate``,
``expert_bytes_moved_total``, plus ``experts_computed_on_cpu_total``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """The series of one server. ``num_experts``: experts per MoE layer (the distinct-experts buckets)."""

    def __init__(self, num_experts: int, max_batch_size: int, *, rate_window: float = 10.0,
                 stats_interval: float = 0.5):
        self.registry = CollectorRegistry()
        r = self.registry
        self._running = Gauge("moe_infer_requests_running", "Requests admitted: prefilling or decoding", registry=r)
        self._waiting = Gauge("moe_infer_requests_waiting", "Requests queued, not admitted yet", registry=r)
        self._requests = Counter("moe_infer_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in ("completed", "cancelled", "failed", "rejected"):
            self._requests.labels(outcome)
        self._prompt_tokens = Counter("moe_infer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self._generated = Counter("moe_infer_generation_tokens", "Tokens generated", registry=r)
        rate = Gauge("moe_infer_generation_tokens_per_second",
                     f"Tokens generated per second over the last {rate_window:g} s", registry=r)
        rate.set_function(self._tokens_per_second)
        self._ttft = Histogram("moe_infer_time_to_first_token_seconds", "From submission to the first token",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("moe_infer_inter_token_latency_seconds", "Between two tokens of one request",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._batch_size = Histogram("moe_infer_micro_batch_size", "Requests per decode forward pass",
                                     buckets=tuple(range(1, max_batch_size + 1)), registry=r)
        self._distinct = Histogram("moe_infer_distinct_experts_per_micro_batch",
                                   "Distinct experts a decode forward pass activates, averaged over MoE layers",
                                   buckets=tuple(range(1, num_experts + 1)), registry=r)
        r.register(_ExpertCacheCollector(self))
        self.rate_window, self.stats_interval = rate_window, stats_interval
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last rate_window seconds
        self._recent_lock = threading.Lock()
        self._stats_at = 0.0
        self.expert_snapshot: dict | None = None  # the last `ModelExecutor.stats()` (replaced whole, never mutated)

    # ------------------------------------------------------------------ fed by the engine thread
    def running(self, count: int) -> None:
        self._running.set(count)

    def waiting(self, count: int) -> None:
        self._waiting.set(count)

    def finished(self, outcome: str) -> None:
        self._requests.labels(outcome).inc()

    def rejected(self) -> None:
        self._requests.labels("rejected").inc()

    def tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self._prompt_tokens.inc(prompt)
        if generated:
            self._generated.inc(generated)
            with self._recent_lock:
                self._recent.append((time.monotonic(), generated))

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def micro_batch(self, size: int, distinct_experts: float) -> None:
        self._batch_size.observe(size)
        self._distinct.observe(distinct_experts)

    def expert_stats(self, executor, *, force: bool = False) -> None:
        """Refresh the expert-cache snapshot from ``executor.stats()`` (call on the engine thread)."""
        now = time.monotonic()
        if force or now - self._stats_at >= self.stats_interval:
            self.expert_snapshot = executor.stats()
            self._stats_at = now

    # ------------------------------------------------------------------ read by the HTTP thread
    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._recent_lock:
            while self._recent and self._recent[0][0] < now - self.rate_window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.rate_window

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ExpertCacheCollector:
    """Expert-cache series from the engine's last `ModelExecutor.stats()` snapshot."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        snapshot = self.metrics.expert_snapshot or {"tiers": {}, "cpu_computed_experts": 0}
        hits = CounterMetricFamily("moe_infer_expert_cache_hits", "Expert lookups served by the tier", labels=["tier"])
        misses = CounterMetricFamily("moe_infer_expert_cache_misses", "Expert lookups the tier missed", labels=["tier"])
        moved = CounterMetricFamily("moe_infer_expert_bytes_moved", "Expert bytes copied into the tier",
                                    labels=["tier"])
        rate = GaugeMetricFamily("moe_infer_expert_cache_hit_rate", "hits / (hits + misses) of the tier",
                                 labels=["tier"])
        for tier, counts in sorted(snapshot["tiers"].items()):
            hits.add_metric([tier], counts.get("hits", 0))
            misses.add_metric([tier], counts.get("misses", 0))
            moved.add_metric([tier], counts.get("bytes_moved", 0))
            lookups = counts.get("hits", 0) + counts.get("misses", 0)
            rate.add_metric([tier], counts.get("hits", 0) / lookups if lookups else 0.0)
        cpu = CounterMetricFamily("moe_infer_experts_computed_on_cpu", "Missed experts run on the CPU instead of fetched")
        cpu.add_metric([], snapshot.get("cpu_computed_experts", 0))
        return [hits, misses, moved, rate, cpu]
