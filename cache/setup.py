"""Building the cache of a wrapped model from its `MoEConfig` (called by the executor).

Which tier has which budget: on a model whose layers compute on CUDA, `gpu_memory` bounds the
GPU tier and `cpu_memory` (optional) a pinned host tier, and the experts' own weights move to host
memory (they are the backing source); on a CPU model, `cpu_memory` bounds the CPU tier and the
backing is the weights where they are (or the converted checkpoint on disk). No budget for the
compute tier: no cache, every expert stays resident.
"""

from __future__ import annotations

import torch

from moe_infer.config import MoEConfig

from .backing import Backing, ModuleBacking, StoreBacking
from .tiered import ExpertCache
from moe_infer.errors import ConfigError


def compute_device(layers) -> torch.device:
    """Where the layers compute: the device of their routers' weights."""
    for p in layers[0].router.parameters():
        return p.device
    return layers[0].expert_source.device


def backing_of(layers) -> Backing | None:
    """The backing the layers' expert sources imply: a converted checkpoint's store when every layer
    reads from the same one (`moe_infer.load` of a converted directory), else None (their weights)."""
    from moe_infer.experts.store import StoreExperts

    sources = [layer.expert_source for layer in layers]
    if sources and all(isinstance(s, StoreExperts) for s in sources) and len({id(s.store) for s in sources}) == 1:
        return StoreBacking(sources[0].store, {layer.layer_idx: layer.expert_source.activation for layer in layers},
                            dtype=sources[0].dtype)
    return None


def check_budgets(layers, config: MoEConfig, backing: Backing | None = None):
    """(compute device, compute-tier budget, host-tier budget) of `config`; raises `ValueError` for
    budgets that cannot apply (and changes nothing)."""
    backing = backing if backing is not None else backing_of(layers)
    device = compute_device(layers)
    if device.type == "cuda":
        budget, host_budget = config.gpu_memory, config.cpu_memory
        if budget is None and host_budget is not None:
            raise ConfigError("cpu_memory on a model that runs on CUDA bounds the pinned host tier behind the GPU "
                             "tier: give gpu_memory too (the GPU tier's budget)")
    else:
        if config.gpu_memory is not None:
            raise ConfigError(f"gpu_memory={config.gpu_memory} but the model runs on {device}; move it to a CUDA "
                             f"device, or give cpu_memory (the CPU tier's budget)")
        budget, host_budget = config.cpu_memory, None
    if budget is not None and config.parallel is not None:
        raise ConfigError("a byte budget for experts (the tiered cache) and parallel cannot be combined in this "
                         "version: every rank would need its own cache of its own experts")
    if budget is not None and config.loader == "ring" and config.cache_policy != "lru":
        raise ConfigError(f"loader='ring' evicts in ring order; cache_policy={config.cache_policy!r} cannot apply "
                         f"(leave it at 'lru')")
    largest = max(backing.expert_nbytes(l.layer_idx) if backing is not None else _expert_nbytes(l, config)
                  for l in layers)
    for name, value in (("gpu_memory" if device.type == "cuda" else "cpu_memory", budget), ("cpu_memory", host_budget)):
        if value is not None and value < largest:
            raise ConfigError(f"{name}={value}: smaller than one expert ({largest} bytes); give at least {largest}")
    return device, budget, host_budget


def _expert_nbytes(layer, config: MoEConfig) -> int:
    """Bytes of one of the layer's in-memory experts as the cache will hold them: quantized when
    `config.quantize` is about to quantize float experts (the budget is checked before that)."""
    from moe_infer.experts.quantized import QuantizedExperts, quantized_expert_nbytes

    source = layer.expert_source
    if config.quantize is not None and not isinstance(source, QuantizedExperts):
        return quantized_expert_nbytes(source, config.quantize)
    return source.expert_nbytes()


def build_cache(layers, config: MoEConfig, backing: Backing | None = None, kernel: str = "torch") \
        -> ExpertCache | None:
    """The cache of `config` (None without a compute-tier budget), computing with `kernel`.

    On CUDA the in-memory model's experts move to host memory (they are the backing): page-locked
    in one registered slab when no `cpu_memory` is given (copied to the GPU as they are), pageable
    when `cpu_memory` bounds a pinned host tier (pinned memory then stays within that budget plus
    the copy engine's staging buffers)."""
    backing = backing if backing is not None else backing_of(layers)
    device, budget, host_budget = check_budgets(layers, config, backing)
    if budget is None:
        return None
    slabs = []
    if backing is None:
        if device.type == "cuda":
            for layer in layers:
                slabs.append(move_experts(layer, torch.device("cpu"), pin=host_budget is None))
        backing = ModuleBacking({layer.layer_idx: layer.expert_source for layer in layers})
    try:
        cache = ExpertCache(backing, [layer.layer_idx for layer in layers], device=device, budget_bytes=budget,
                            host_budget_bytes=host_budget, policy=config.cache_policy, loader=config.loader,
                            cpu_compute=config.cpu_compute, kernel=kernel, load_timeout=config.load_timeout)
    except BaseException:
        for layer in layers:
            move_experts(layer, device)
        raise
    cache.host_slabs = [slab for slab in slabs if slab is not None]  # released with the cache's owner
    return cache


def move_experts(layer, device: torch.device, *, pin: bool = False):
    """Move a layer's expert parameters (the backing of the cache) to `device`, in place. With `pin`
    (to the host on a CUDA machine) they become views of one page-locked `HostSlab`, returned:
    pinning each parameter on its own would round each up to a power of two."""
    from moe_infer.experts.quantized import QuantizedExperts

    pin = pin and device.type == "cpu"
    source = layer.expert_source
    if isinstance(source, QuantizedExperts):  # quantized in memory: its tensors (the float ones are meta)
        tensors = source.tensors()
        if all(t.device == device and (not pin or t.is_pinned()) for t in tensors):
            return None
        moved, slab = _move_tensors(tensors, device, pin)
        source.replace_tensors(moved)
        return slab
    params = [p for p in layer.experts.parameters(recurse=False) if not p.is_meta and
              (p.device != device or (pin and not p.is_pinned()))]
    if not params:
        return None
    moved, slab = _move_tensors([p.data for p in params], device, pin)
    for param, data in zip(params, moved):
        param.data = data
    return slab


def _move_tensors(tensors, device: torch.device, pin: bool):
    """Copies of `tensors` on `device` and the `HostSlab` they view when `pin` (else None)."""
    if not pin:
        return [t.to(device) for t in tensors], None
    from .pool import HostSlab

    offsets, total = [], 0
    for t in tensors:
        total = -(-total // 64) * 64
        offsets.append(total)
        total += t.numel() * t.element_size()
    slab = HostSlab(total, pin=True)
    moved = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        view = slab.tensor[offset:offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        moved.append(view)
    return moved, slab
