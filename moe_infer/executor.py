"""`ModelExecutor`: the executors of one wrapped model, their configuration and their statistics.

Owns which `MoEConfig` values this version can run (anything else is refused with a message
saying what is missing), the per-model statistics of DESIGN section 3, and the runtime switches
(`set_parallelism`). The per-layer computation lives in `moe_infer.layer`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_infer.config import MoEConfig
from moe_infer.layer import MoELayer

# Fields that need machinery this version does not have yet, and what that machinery is.
_NOT_YET = {
    "gpu_memory": "the tiered expert cache (GPU/CPU/disk budgets)",
    "cpu_memory": "the tiered expert cache (GPU/CPU/disk budgets)",
    "offload_dir": "the disk tier of the expert cache",
    "cache_policy": "the tiered expert cache and its policies",
    "predictor": "predictive routing and prefetch",
    "prefetch_depth": "predictive routing and prefetch",
    "loader": "the SE-MoE ring loader",
    "cpu_compute": "CPU compute of missed experts",
    "placement": "expert placement across devices",
    "parallel": "multi-rank parallelism",
    "routing_override": "trace replay",
}


def check_supported(config: MoEConfig) -> None:
    """Raise `NotImplementedError` naming every field set to a value this version cannot run."""
    problems = []
    if config.kernel == "triton":
        problems.append("kernel='triton' (the fused Triton kernels are not in this version; "
                        "use 'auto' or 'torch')")
    defaults = MoEConfig()
    for name, needs in _NOT_YET.items():
        value = getattr(config, name)
        if value is not getattr(defaults, name) and value != getattr(defaults, name):
            problems.append(f"{name}={value!r} (needs {needs})")
    if problems:
        raise NotImplementedError(
            f"this version of moe_infer cannot run MoEConfig "
            f"{'; '.join(problems)}; only the default value of these fields works in this version"
        )


class ModelExecutor:
    """The MoE layers of one wrapped model (`moe_infer.executor(model)`)."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], config: MoEConfig):
        self.model_class = type(model).__name__
        self.layers = layers
        self.config = config
        for layer in layers:
            layer.executor = self

    @property
    def kernel(self) -> str:
        """The kernel actually used: "auto" resolves to torch (no Triton kernels in this version)."""
        return "torch"

    def configure(self, config: MoEConfig) -> None:
        check_supported(config)
        self.config = config

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

    def stats(self) -> dict[str, Any]:
        """Counters since wrapping or the last `reset_stats()`.

        Every expert is resident in this version, in the memory of the device that holds its weights
        (tier "gpu" or "cpu"): each expert a forward call uses is a hit in that tier, nothing is
        fetched, prefetched or computed elsewhere.
        """
        per_layer = {}
        tiers: dict[str, dict[str, float]] = {}
        for layer in self.layers:
            s = layer.stats
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
        return {
            "tokens": first.tokens,
            "calls": first.calls,
            "expert_activations": sum(sum(l.stats.expert_counts) for l in self.layers),
            "layers": per_layer,
            "tiers": tiers,
            "prefetch": {"issued": 0, "used": 0, "wasted": 0},
            "predictor_recall": None,
            "cpu_computed_experts": 0,
            "stall_seconds": 0.0,
            "kernel": self.kernel,
        }

    def set_parallelism(self, r: int) -> None:
        raise RuntimeError(
            "set_parallelism switches the sharding factor of a multi-rank run (MoEConfig.parallel); "
            "this version runs every expert in one process, so there is nothing to switch"
        )

    def __repr__(self) -> str:
        return (f"ModelExecutor({self.model_class}, moe_layers={self.moe_layer_indices}, "
                f"family={self.layers[0].family}, kernel={self.kernel})")
