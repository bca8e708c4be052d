"""`ModelExecutor`: the executors of one wrapped model, their configuration and their statistics.

Owns which `MoEConfig` values this version can run (anything else is refused with a message
saying what is missing), the per-model statistics of DESIGN section 3, and the runtime switches
(`set_parallelism`), and which runner each layer computes its experts with (`moe_infer.runners`,
chosen again whenever the configuration changes). The per-layer data flow lives in `moe_infer.layer`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from typing import Any

import torch
from torch import nn

from moe_infer.cache.replay import RoutingReplay
from moe_infer.cache.setup import build_cache, check_budgets, compute_device
from moe_infer.cache.pool import pinned_bytes
from moe_infer.cache.report import process_memory
from moe_infer.cache.tiered import ExpertCache
from moe_infer import envs, kernels
from moe_infer.config import MoEConfig
from moe_infer.layer import MoELayer
from moe_infer.runners import choose_runner
from moe_infer.errors import ConfigError, NotSupported

def check_supported(config: MoEConfig) -> None:
    """Raise `NotSupported` (a `NotImplementedError`) when this machine cannot run `config`:
    `kernel='triton'` without Triton, or without CUDA and without Triton's interpreter."""
    if config.kernel == "triton" and not kernels.HAS_TRITON:
        raise NotSupported("this machine cannot run MoEConfig kernel='triton' (Triton is not installed on this "
                           "platform); use 'auto' or 'torch'")
    if config.kernel == "triton" and not (torch.cuda.is_available() or envs.triton_interpret()):
        raise NotSupported("this machine cannot run MoEConfig kernel='triton' (the fused Triton kernels need a CUDA "
                           "device, or TRITON_INTERPRET=1 for Triton's CPU interpreter); use 'auto' or 'torch'")


class _Reconfiguring:
    """An executor attribute whose every change is a reconfiguration: the layers get their runners again."""

    def __set_name__(self, owner, name: str) -> None:
        self.stored = "_" + name

    def __get__(self, executor, owner=None):
        return self if executor is None else getattr(executor, self.stored)

    def __set__(self, executor, value) -> None:
        setattr(executor, self.stored, value)
        executor._choose_runners()


class ModelExecutor:
    """The MoE layers of one wrapped model (`moe_infer.executor(model)`)."""

    cache = _Reconfiguring()  # ExpertCache | None: the tiered expert cache, when a budget is set
    replay = _Reconfiguring()  # RoutingReplay | None: the trace replayed instead of the routers (routing_override)

    def __init__(self, model: nn.Module, layers: list[MoELayer], config: MoEConfig, backing=None):
        self.model_class = type(model).__name__
        self.layers = layers
        self.config = config
        self.backing = backing  # a converted checkpoint's experts (load); None: the layers' own weights
        self._cache: ExpertCache | None = None  # the tiered expert cache, when a budget is set
        self._replay: RoutingReplay | None = None  # MoEConfig.routing_override
        self.predictor_hook = None  # MoEConfig.predictor: predictions -> cache.prefetch (moe_infer.predictors)
        self._embedding = model.get_input_embeddings()
        self._model = weakref.ref(model)  # the model's decoder layers, for a predictor's attention lookahead
        self._model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        self._expert_devices = {layer.layer_idx: layer.expert_source.device for layer in layers}
        # MoEConfig.placement, loaded and checked against the model: the parallel path runs each expert
        # on its planned rank; one process only records it
        self.placement = self._load_placement(config)
        self._apply(config)
        # concurrent callers of one wrapped model are serialised: one whole forward at a time (its
        # layer calls, the predictor's per-call state and the cache's reservations belong together)
        self.forward_lock = threading.RLock()
        self._lock_handles = [model.register_forward_pre_hook(self._lock_forward),
                              model.register_forward_hook(self._unlock_forward, always_call=True)]
        self.parallel = None  # moe_infer.distributed.parallel.ParallelRuntime when config.parallel is set
        self._configure_parallel(config)
        for layer in layers:
            layer.executor = self
        self._choose_runners()

    def _choose_runners(self) -> None:
        """Give every layer the replay and the runner of the current configuration: the cache's when a
        budget built one, the multi-rank path's, or the in-memory experts' (`moe_infer.runners`)."""
        for layer in self.layers:
            layer.replay = self._replay
            layer.runner = choose_runner(layer, self._cache, self.kernel_for)

    def _apply(self, config: MoEConfig) -> None:
        """Build the cache and the replay of `config` (everything is checked before anything changes)."""
        replay = None
        if config.routing_override is not None:
            first = self.layers[0]
            replay = RoutingReplay(config.routing_override, self.moe_layer_indices, first.num_experts,
                                   first.adapter.top_k)
        predictor = None
        if config.predictor is not None:
            from moe_infer.predictors.runtime import PredictionHook, checked_predictor

            predictor = checked_predictor(self, self._model_name, config.predictor)
        check_budgets(self.layers, config, self.backing)
        self._check_quantize(config)
        self._offload(config)
        lookahead = None
        if predictor is not None and predictor.reads_attention_lookahead:
            from moe_infer.predictors.lookahead import AttentionLookahead

            lookahead = AttentionLookahead(self._model(), self.layers)  # checks the model; then hooks its layers
        self.close()
        self._quantize(config.quantize)
        try:
            self.cache = build_cache(self.layers, config, self.backing,
                                     kernel=self.kernel_for(compute_device(self.layers), config))
        except BaseException:
            if lookahead is not None:
                lookahead.detach()
            raise
        self.replay = replay
        if self.cache is not None and config.cache_policy == "static" and replay is not None:
            self.cache.pin_popular(replay.trace)  # the replayed trace's popularity is the right hot set
        if predictor is not None:
            # prefetch_depth 0: predictions are scored (stats) but nothing is prefetched
            sink = self.cache.prefetch if self.cache is not None and config.prefetch_depth > 0 else None
            self.predictor_hook = PredictionHook(self, self._embedding, predictor, max(config.prefetch_depth, 1),
                                                 sink, lookahead)

    def _lock_forward(self, module, args) -> None:
        self.forward_lock.acquire()

    def _unlock_forward(self, module, args, output) -> None:
        self.forward_lock.release()  # always_call: also when the forward raised

    def detach(self) -> None:
        """Remove the hooks this executor put on the model (unwrap)."""
        for handle in self._lock_handles:
            handle.remove()
        self._lock_handles = []

    def _offload(self, config: MoEConfig) -> None:
        """MoEConfig.offload_dir: write the in-memory experts there once (`moe_infer.experts.offload`)
        and read them from it from now on, like a converted checkpoint's. Layers that already read a
        store (a converted checkpoint, or an earlier offload) keep it: it is their disk tier."""
        from moe_infer.experts.store import StoreExperts

        stores = [layer.expert_source.store for layer in self.layers if isinstance(layer.expert_source, StoreExperts)]
        if stores:
            root = stores[0].root
            if config.offload_dir is not None and os.path.realpath(config.offload_dir) != os.path.realpath(root):
                raise ConfigError(f"offload_dir={str(config.offload_dir)!r}: this model's experts are already read "
                                  f"from {root}, which is its disk tier")
            return
        if config.offload_dir is None:
            return
        if config.parallel is not None:
            raise ConfigError("offload_dir and parallel cannot be combined in this version: each rank holds a "
                              "slice of every expert, not whole experts to write")
        from moe_infer.experts.offload import offload_layers
        from moe_infer.loading import mark_store_backed

        store = offload_layers(self.layers, config.offload_dir, self._model_name)
        mark_store_backed(self._model(), store)  # unwrap refuses: the experts are no longer in memory

    def close(self) -> None:
        """Stop the cache's threads and put expert weights moved to host memory back where they were."""
        if self.predictor_hook is not None:
            self.predictor_hook.detach()
            self.predictor_hook = None
        if self.cache is not None:
            self.cache.close()
            cache, self.cache = self.cache, None
            if self.backing is None:
                from moe_infer.cache.setup import move_experts

                for layer in self.layers:
                    move_experts(layer, self._expert_devices[layer.layer_idx])
            for slab in cache.host_slabs:  # the experts' page-locked host copy, now unused
                slab.close()

    @property
    def quantization(self):
        """The `QuantScheme` of the experts the layers run (quantized in memory by `quantize=`, or read
        from a checkpoint converted with `--quantize`), or None for float experts."""
        source = self.layers[0].expert_source
        store = getattr(source, "store", None)
        return store.quant_scheme if store is not None else getattr(source, "scheme", None)

    def _check_quantize(self, config: MoEConfig) -> None:
        """Refuse a `quantize` this model cannot take, and what quantized experts cannot run with yet
        (before anything changes)."""
        from moe_infer.experts.store import StoreExperts

        current, wanted = self.quantization, config.quantize
        if wanted is not None or current is not None:
            if config.parallel is not None:
                raise NotSupported("parallel with quantized experts: the multi-rank path slices float experts only "
                                   "in this version")
        if wanted is None or wanted == current:
            return
        if any(isinstance(layer.expert_source, StoreExperts) for layer in self.layers):
            raise ConfigError(f"quantize={wanted.name!r}: this model reads its experts from a converted checkpoint "
                              f"(stored as {current.name if current else 'float'}); convert it with "
                              f"`moe-infer convert SRC DST --quantize {wanted.name}` instead")
        if current is not None:
            raise ConfigError(f"quantize={wanted.name!r}: the experts of this model were quantized to {current.name} "
                              f"(group {current.group_size}) and their float weights released; wrap a freshly "
                              f"loaded model to quantize it differently")
        if config.offload_dir is not None:
            raise NotSupported("quantize with offload_dir: the disk tier of an in-memory model holds float experts in "
                               "this version; convert the checkpoint with --quantize instead")

    def _quantize(self, scheme) -> None:
        """Quantize the routed experts of every layer in memory (once; `_check_quantize` ran)."""
        if scheme is None or self.quantization is not None:
            return
        from moe_infer.experts.layout import ModuleExperts
        from moe_infer.experts.quantized import QuantizedExperts, free_float_experts

        device = compute_device(self.layers)  # experts in host memory of a CUDA model quantize on its GPU
        for layer in self.layers:
            assert isinstance(layer.expert_source, ModuleExperts), type(layer.expert_source)
            with torch.no_grad():
                layer.expert_source = QuantizedExperts.quantize(layer.expert_source, scheme, device)
            free_float_experts(layer.experts)
            self._expert_devices[layer.layer_idx] = layer.expert_source.device

    @property
    def kernel(self) -> str:
        """The kernel the layers computed with since the last `reset_stats()` ("triton" or "torch";
        "mixed" when both ran), or, before any call, the kernel they will use. The expert cache
        runs the fused kernels over its slot pool, so a budget does not change the kernel."""
        ran = {kernel for layer in self.layers for kernel, calls in layer.stats.kernel_calls.items() if calls}
        if not ran:
            ran = {self.cache.kernel} if self.cache is not None else \
                {self.kernel_for(layer.expert_source.device) for layer in self.layers}
        return ran.pop() if len(ran) == 1 else "mixed"

    def kernel_for(self, device: torch.device, config: MoEConfig | None = None) -> str:
        """The kernel for experts computed on `device`: "auto" is Triton on CUDA, torch elsewhere."""
        config = config if config is not None else self.config
        if config.kernel != "auto":
            return config.kernel
        return "triton" if device.type == "cuda" and kernels.HAS_TRITON else "torch"

    def configure(self, config: MoEConfig) -> None:
        check_supported(config)
        placement = self._load_placement(config)
        if config.parallel is None and self.parallel is not None:
            self.stop_parallel()  # the full expert weights back first: the cache set up next reads them
            self.config = dataclasses.replace(self.config, parallel=None)
        self._apply(config)
        self.placement = placement
        self._configure_parallel(config)
        self.config = config
        self._choose_runners()

    def _load_placement(self, config: MoEConfig):
        """The plan at `config.placement` (None when unset), refused unless it is a plan for this
        model's MoE layers and experts."""
        if config.placement is None:
            return None
        from moe_infer.distributed.placement import PlacementPlan

        plan = PlacementPlan.load(config.placement)
        experts = self.layers[0].num_experts
        if list(plan.moe_layers) != self.moe_layer_indices or plan.num_experts != experts:
            raise ConfigError(
                f"MoEConfig.placement={str(config.placement)!r}: the plan places {plan.num_experts} experts on MoE "
                f"layers {list(plan.moe_layers)}, this model has {experts} experts on MoE layers "
                f"{self.moe_layer_indices}; plan it from a trace of this model (moe-infer placement)"
            )
        return plan

    def _configure_parallel(self, config: MoEConfig) -> None:
        if config.parallel is None:
            self.stop_parallel()
        elif self.parallel is None:
            from moe_infer.distributed.parallel import build_runtime

            self.parallel = build_runtime(self.layers, config.parallel, placement=self.placement)
        else:  # a new MoEConfig.placement replaces the plan; otherwise set_parallelism's stays
            plan = self.placement if config.placement != self.config.placement else self.parallel.placement
            self.parallel.set(config.parallel, capacity_factor=self.parallel.capacity_factor, placement=plan)

    def stop_parallel(self) -> None:
        """Leave the multi-rank path: the full expert weights are gathered back into every rank's
        experts modules (a collective: every rank must call it, as `unwrap` and
        `configure(parallel=None)` do)."""
        if self.parallel is not None:
            from moe_infer.distributed.parallel import release

            release(self.layers)
            self.parallel = None
            self._choose_runners()

    def layer(self, layer_idx: int) -> MoELayer:
        for layer in self.layers:
            if layer.layer_idx == layer_idx:
                return layer
        raise KeyError(f"no MoE layer {layer_idx}; MoE layers are {[l.layer_idx for l in self.layers]}")

    @property
    def moe_layer_indices(self) -> list[int]:
        return [layer.layer_idx for layer in self.layers]

    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.stats.reset()
        if self.cache is not None:
            self.cache.reset_stats()
        if self.predictor_hook is not None:
            self.predictor_hook.reset_stats()
        if self.parallel is not None:
            self.parallel.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Counters since wrapping or the last `reset_stats()`.

        Without a budget every expert is resident in the memory of the device that holds its weights
        (tier "gpu" or "cpu"): each expert a forward call uses is a hit there. With a budget, the
        tiers, prefetches, CPU-computed experts and stall time are the expert cache's.
        """
        per_layer = {}
        tiers: dict[str, dict[str, float]] = {}
        for layer in self.layers:
            s = layer.stats
            s.flush()
            used = sum(1 for c in s.expert_counts if c)
            mean = sum(s.expert_counts) / len(s.expert_counts)
            per_layer[layer.layer_idx] = {
                "calls": s.calls,
                "tokens": s.tokens,
                "expert_counts": list(s.expert_counts),
                "experts_used": used,
                "load_imbalance": (max(s.expert_counts) / mean) if mean else 0.0,
            }
            tier = "gpu" if layer.expert_source.device.type == "cuda" else "cpu"
            t = tiers.setdefault(tier, {"hits": 0, "misses": 0, "bytes_moved": 0, "peak_bytes": 0})
            t["hits"] += s.expert_loads
            t["peak_bytes"] += layer.expert_source.expert_nbytes() * layer.num_experts
        first = self.layers[0].stats
        cache = self.cache.stats() if self.cache is not None else {
            "tiers": tiers, "prefetch": {"issued": 0, "used": 0, "wasted": 0, "cancelled": 0},
            "cpu_computed_experts": 0, "stall_seconds": 0.0}
        return {
            "tokens": first.tokens,
            "calls": first.calls,
            "expert_activations": sum(sum(l.stats.expert_counts) for l in self.layers),
            "layers": per_layer,
            "tiers": cache["tiers"],
            "prefetch": cache["prefetch"],
            "predictor_recall": self.predictor_hook.recall() if self.predictor_hook is not None else None,
            "predictor_seconds": self.predictor_hook.seconds if self.predictor_hook is not None else 0.0,
            "cpu_computed_experts": cache["cpu_computed_experts"],
            "stall_seconds": cache["stall_seconds"],
            "kernel": self.kernel,
            "quantization": None if self.quantization is None else self.quantization.as_json(),
            "kernel_calls": {kernel: sum(l.stats.kernel_calls.get(kernel, 0) for l in self.layers)
                             for kernel in ("torch", "triton")},
            "host_reads": cache.get("host_reads", 0),  # device -> host reads of routing the cache made
            "memory": cache["memory"] if "memory" in cache else {"pinned_bytes": pinned_bytes(), **process_memory()},
            "parallel": None if self.parallel is None else self.parallel.stats(),
        }

    def set_parallelism(self, r: int | str, *, capacity_factor: float | None = None, placement: Any = None) -> None:
        """Switch the sharding factor of the following forward calls (moves no stored weights).

        `r`: 0 (data parallel), a divisor of the world size (1 = expert parallel, world size =
        tensor-sliced experts), "ep", "tp" or "auto" (the cost model picks r per call).
        `capacity_factor`: None = dropless; c > 0 keeps at most ceil(c * T * K / E) (token, expert)
        pairs per rank and expert (T = largest token count of a rank), giving fixed message shapes.
        `placement`: an object with `device_of(layer_idx, expert) -> int` (e.g. a
        `moe_infer.distributed.placement.PlacementPlan`); each expert then runs on its planned rank (r = 1)
        or on the r ranks that include it; None keeps MoEConfig.placement's plan (if set).
        Every rank must make the same call.
        """
        if self.parallel is None:
            raise RuntimeError(
                "set_parallelism switches the sharding factor of a multi-rank run; wrap the model with "
                "MoEConfig(parallel='auto' | 'ep' | 'tp' | r) under torchrun or deepspeed first"
            )
        self.parallel.set(r, capacity_factor=capacity_factor, placement=placement if placement is not None
                          else self.placement)
        self.config = dataclasses.replace(self.config, parallel=r)

    def __repr__(self) -> str:
        return (f"ModelExecutor({self.model_class}, moe_layers={self.moe_layer_indices}, "
                f"family={self.layers[0].family}, kernel={self.kernel})")
