"""Models whose experts live in a converted checkpoint: the dense weights and the store-backed MoE layers.

Owns loading `dense.safetensors` into the model built from config.json on `meta`
(`moe_infer.experts.skeleton`) with `assign=True`, pointing every wrapped MoE layer at a
`StoreExperts` source, and recording which store a model reads its experts from (`unwrap`
refuses such a model). The expert parameters stay on `meta`: the model never holds them.
`moe_infer.load` wraps the model between the two steps. Does not own the checkpoint format
(`moe_infer.experts.store`) or conversion (`moe_infer.experts.convert`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_infer.experts.skeleton import build_from_config, check_against_manifest, expert_parameter_names
from moe_infer.experts.skeleton import parameters_on_meta, skeleton  # noqa: F401 (moe_infer.loading's old names)
from moe_infer.experts.store import DENSE_FILE, ExpertStore, StoreExperts
from moe_infer.experts.tensorfile import CheckpointError

_STORE_ATTR = "_moe_infer_store"


def load_dense(path: str, *, dtype: Any = "auto", device: str | torch.device | None = None,
               checksums: str = "first") -> tuple[nn.Module, Any, torch.dtype | None]:
    """(model, store, dtype) of a converted checkpoint directory: the model built from its
    config.json on `meta` with the dense weights loaded (`checksums` as `ExpertStore.open`), its
    expert store, and the dtype the experts are read in (None: as stored). Not wrapped yet."""
    store = ExpertStore.open(path, checksums=checksums)
    want = None if dtype in ("auto", None) else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    _, model, blocks = build_from_config(path, want)
    check_against_manifest(path, store, blocks)
    expert_params = expert_parameter_names(model, blocks)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    state = {}
    for name, tensor in store.dense_tensors():  # checked against the manifest once the loop ends
        if want is not None and tensor.is_floating_point() and not any(p in name for p in keep_fp32):
            tensor = tensor.to(want)
        state[name] = tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    unexpected = list(result.unexpected_keys)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()]
               if p.is_meta and name not in expert_params]
    if unexpected or missing:
        raise CheckpointError(f"{path}: {DENSE_FILE} does not match the model built from config.json: "
                              f"unexpected {unexpected[:5]}, missing {missing[:5]}")
    if device is not None:
        _to_device_except_meta(model, torch.device(device))
    return model, store, want


def read_experts_from(model: nn.Module, layers: list, store, *, device: str | torch.device | None,
                      dtype: torch.dtype | None) -> None:
    """Point every wrapped MoE layer of `model` at its experts in `store` (read on `device`, in
    `dtype`), and record that the model's experts live there."""
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    for layer in layers:
        layer.expert_source = StoreExperts(store, layer.layer_idx, layer.expert_source.activation,
                                           device=target_device, dtype=dtype)
    mark_store_backed(model, store)


def mark_store_backed(model: nn.Module, store) -> None:
    """Record that `model`'s experts are read from `store` and not held in memory (`unwrap` refuses)."""
    object.__setattr__(model, _STORE_ATTR, store)


def expert_store_of(model: nn.Module):
    """The ExpertStore a model loaded from a converted checkpoint reads its experts from, or None."""
    return getattr(model, _STORE_ATTR, None)


def _to_device_except_meta(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta:
                module._parameters[name] = type(param)(param.to(device), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
