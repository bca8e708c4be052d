"""Models whose experts live in a converted checkpoint: the parameter-free skeleton, the dense
weights, and the store-backed MoE layers (`moe_infer.load` of a converted directory).

Owns: building a `transformers` model from a config with every parameter on the `meta` device
(buffers are real: rotary tables and other non-persistent buffers are computed as usual), loading
`dense.safetensors` into it with `assign=True`, and pointing every wrapped MoE layer at a
`StoreExperts` source. The expert parameters stay on `meta`: the model never holds them.
Does not own the checkpoint format (`moe_infer.experts.store`) or conversion (`...experts.convert`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
from torch import nn

_STORE_ATTR = "_moe_infer_store"


@contextlib.contextmanager
def parameters_on_meta():
    """Within the block, every parameter a module registers is moved to the `meta` device at once
    (buffers are left alone). Scoped: the original `register_parameter` is restored on exit."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal-LM model of `config` with all parameters on `meta` (no weight memory)."""
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_from_config(root: str, dtype: torch.dtype | None = None):
    """(config, meta-device skeleton, MoE blocks) of the model directory `root`, built from its
    config.json (without any quantization_config: the skeleton's linear layers are plain). A
    missing or unreadable config.json, or one naming an architecture transformers does not know,
    is a `CheckpointError` naming the directory."""
    from transformers import AutoConfig

    from moe_infer.errors import CheckpointError
    from moe_infer.families import find_moe_blocks

    if not os.path.isfile(os.path.join(root, "config.json")):
        raise CheckpointError(f"{root}: no config.json (a converted checkpoint keeps its model's config.json; "
                              f"convert again)")
    try:
        config = AutoConfig.from_pretrained(root)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{root}: config.json names an architecture transformers does not know, or is "
                              f"unreadable ({str(err).splitlines()[0]})") from None
    clean = copy.deepcopy(config)
    if hasattr(clean, "quantization_config"):
        del clean.quantization_config
    try:
        model = skeleton(clean, dtype)
    except ValueError as err:
        raise CheckpointError(f"{root}: no causal-LM model class for {type(config).__name__} "
                              f"({str(err).splitlines()[0]})") from None
    return config, model, find_moe_blocks(model)  # UnsupportedModel names the supported families


def check_against_manifest(root: str, store, blocks) -> None:
    """The model built from config.json must be the one the manifest describes: the same MoE
    layers, and in each the same number of experts, top-k, hidden and intermediate sizes (a
    config edited after conversion would otherwise route differently, silently)."""
    from moe_infer.errors import CheckpointError
    from moe_infer.experts.layout import ModuleExperts

    layer_ids = [found.layer_idx for found in blocks]
    if layer_ids != store.moe_layers:
        raise CheckpointError(f"{root}: the model built from config.json has MoE layers {layer_ids}, the manifest "
                              f"lists {store.moe_layers}")
    for found in blocks:
        experts = ModuleExperts(found.module.experts, None)
        layout = store.layout(found.layer_idx)
        top_k = getattr(getattr(found.module, found.router_attr), "top_k", store.top_k)
        for what, from_config, from_manifest in (
                ("number of experts", experts.num_experts, store.num_experts), ("top_k", top_k, store.top_k),
                ("hidden size", experts.hidden_size, layout.hidden_size),
                ("expert intermediate size", experts.intermediate_size, layout.intermediate_size)):
            if int(from_config) != int(from_manifest):
                raise CheckpointError(f"{root}: config.json gives MoE layer {found.layer_idx} a {what} of "
                                      f"{from_config}, the converted checkpoint (moe_infer.json and its expert files) "
                                      f"has {from_manifest}; config.json was changed after conversion (restore it or "
                                      f"convert again)")


def expert_parameter_names(model: nn.Module, blocks) -> set[str]:
    """State-dict names of the experts' parameters of every MoE block."""
    names = set()
    for found in blocks:
        for pname, _ in found.module.experts.named_parameters():
            names.add(f"{found.name}.experts.{pname}")
    return names


def load_converted(path: str, *, dtype: Any = "auto", device: str | torch.device | None = None,
                   fields: dict | None = None, checksums: str = "first") -> nn.Module:
    """A wrapped model over a converted checkpoint directory (see `moe_infer.load`; `checksums` as
    `ExpertStore.open`)."""
    from moe_infer.api import wrap
    from moe_infer.experts.store import DENSE_FILE, ExpertStore, StoreExperts
    from moe_infer.experts.tensorfile import CheckpointError

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
    wrap(model)  # no expert cache yet: the experts are on meta until the store serves them
    from moe_infer.api import executor

    target_device = torch.device(device) if device is not None else torch.device("cpu")
    for layer in executor(model).layers:
        module_source = layer.expert_source
        layer.expert_source = StoreExperts(store, layer.layer_idx, module_source.activation, device=target_device,
                                           dtype=want)
    mark_store_backed(model, store)
    if fields:
        wrap(model, **fields)  # budgets: the tiered cache is built over the store (moe_infer.cache.setup)
    return model


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
