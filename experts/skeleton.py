"""The parameter-free model of a checkpoint: built from its config.json on the `meta` device.

Owns building a `transformers` causal-LM model from a config with every parameter on `meta`
(buffers are real: rotary tables and other non-persistent buffers are computed as usual), finding
its MoE blocks, and checking them against a converted checkpoint's manifest. What the converter
(`experts.convert`), the store's `verify`, the synthetic checkpoints and `moe_infer.load` share;
it sits below all of them and imports only the model families and the expert layout.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from moe_infer.errors import CheckpointError
from moe_infer.experts.layout import ModuleExperts
from moe_infer.families import find_moe_blocks


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
