"""Public entry points: `wrap`, `unwrap`, `executor`, `load`.

`wrap` replaces every sparse MoE block of a model, in place, by a `MoELayer` that computes the
same outputs. Everything that can fail is checked before the first block is replaced, so an
error leaves the model exactly as it was.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from moe_infer import hub
from moe_infer.config import MoEConfig, check_field_names
from moe_infer.errors import ConfigError
from moe_infer.executor import ModelExecutor, check_supported
from moe_infer.experts.convert import convert, default_converted_dir
from moe_infer.experts.layout import UnsupportedExperts
from moe_infer.experts.store import MANIFEST
from moe_infer.families import UnsupportedModel, find_moe_blocks
from moe_infer.layer import MoELayer
from moe_infer.loading import expert_store_of, load_dense, read_experts_from
from moe_infer.wrapped import executor_of, set_executor

_PROBE_TOKENS = 64


def executor(model: nn.Module) -> ModelExecutor:
    """The executor behind a wrapped model."""
    ex = executor_of(model)
    if ex is None:
        raise ConfigError(f"{type(model).__name__} is not wrapped; call moe_infer.wrap(model) first")
    return ex


def is_wrapped(model: nn.Module) -> bool:
    return executor_of(model) is not None


def wrap(model: nn.Module, config: MoEConfig | None = None, **fields: Any) -> nn.Module:
    """Make every sparse MoE block of `model` run through moe_infer; returns the same object.

    `config` and/or MoEConfig fields as keywords. On an already wrapped model this reconfigures it:
    the fields given replace those of the current configuration (or of `config`, if given).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if config is not None and not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a moe_infer.MoEConfig, got {type(config).__name__}")
    check_field_names(fields)
    wrapped = executor_of(model)
    base = config if config is not None else (wrapped.config if wrapped is not None else MoEConfig())
    new_config = base.replace(**fields) if fields else base
    check_supported(new_config)
    if wrapped is not None:
        wrapped.configure(new_config)
        return model

    blocks = find_moe_blocks(model)
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
    layers = []
    for found in blocks:
        try:
            layers.append(MoELayer(found, _text_hidden_act(model, found.module) or hidden_act))
        except UnsupportedExperts as err:
            raise UnsupportedModel(f"{type(model).__name__}: MoE block at '{found.name}': {err}") from None
    for layer in layers:
        _verify_routing(layer)

    ex = ModelExecutor(model, layers, new_config)  # builds the expert cache, may join the process group
    # nothing can fail from here on: swap the blocks in
    for found, layer in zip(blocks, layers):
        parent_name, _, attr = found.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
    set_executor(model, ex)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original MoE blocks back; the model then computes exactly what it did before `wrap`.

    Refused for a model loaded from a converted checkpoint or wrapped with `offload_dir`: its experts
    live only in the store (their parameters are on the `meta` device), so the original blocks
    could not run; likewise for a model wrapped with `quantize=` (only the quantized experts remain).

    A model wrapped with `parallel` holds only its rank's slice of every expert; unwrap gathers the
    full weights back (bit-exact) with an all-gather, so every rank of the job must call it."""
    ex = executor(model)
    if expert_store_of(model) is not None:
        raise ConfigError(f"unwrap: this {type(model).__name__} reads its experts from the expert store "
                         f"{expert_store_of(model).root} (a converted checkpoint it was loaded from, or its "
                         f"MoEConfig.offload_dir); they are not in memory, so there are no original MoE blocks "
                         f"to restore (load the transformers directory with moe_infer.load(path, "
                         f"in_memory=True) and no offload_dir to get an unwrappable model)")
    if ex.quantization is not None:
        raise ConfigError(f"unwrap: this {type(model).__name__}'s experts were quantized in memory "
                          f"({ex.quantization.name}) and their float weights released, so there are no original MoE "
                          f"blocks to restore (wrap a freshly loaded model without quantize= to get an unwrappable one)")
    ex.close()
    ex.detach()
    ex.stop_parallel()  # a parallel model's experts hold one slice per rank: gathered back first
    for layer in ex.layers:
        parent_name, _, attr = layer.block_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.restore())
    set_executor(model, None)
    return model


def _text_hidden_act(model: nn.Module, block: nn.Module) -> str | None:
    """The activation name of the config the experts were built from (multimodal models nest it)."""
    cfg = getattr(block.experts, "config", None)
    return getattr(cfg, "hidden_act", None) if cfg is not None else None


@torch.no_grad()
def _verify_routing(layer: MoELayer) -> None:
    """Route a random probe batch through the adapter and through the family's own router: ids must
    be identical and weights equal, or the model is refused (wrapping must not change outputs)."""
    router = layer.router
    weights = [p for p in router.parameters()] + [p for p in router.buffers()]
    param = layer.experts.gate_up_proj
    if param.is_meta and weights:  # experts left in a converted checkpoint's store: probe like the router's weights
        param = weights[0]
    if param.is_meta or any(p.is_meta for p in weights):
        return  # nothing to compare on the meta device (the weights arrive later)
    generator = torch.Generator().manual_seed(0)  # a private generator: the user's RNG stream is untouched
    hidden_size = layer.expert_source.hidden_size
    probe = torch.randn(_PROBE_TOKENS, hidden_size, generator=generator).to(param.device, param.dtype)
    was_training = router.training
    router.train(False)
    try:
        expected = layer.family_router_output(probe)
    finally:
        router.train(was_training)
    got = layer.route(probe)
    _, expected_weights, expected_ids = expected
    same = (
        torch.equal(got.expert_ids, expected_ids)
        and got.expert_weights.dtype == expected_weights.dtype
        and torch.allclose(got.expert_weights, expected_weights, rtol=1e-6, atol=0)
    )
    if not same:
        raise UnsupportedModel(
            f"MoE block at '{layer.block_name}' ({type(router).__name__}): the {layer.adapter.name} routing "
            f"adapter does not reproduce this router on a probe batch; refusing to wrap (please report this model)"
        )


def load(path: str | os.PathLike, *, dtype: Any = "auto", device: str | torch.device | None = None,
         in_memory: bool = False, converted_dir: str | os.PathLike | None = None, checksums: str = "first",
         **fields: Any) -> nn.Module:
    """A wrapped model from a converted checkpoint directory or a plain `transformers` directory
    (MoEConfig fields as keywords).

    Converted directory (has `moe_infer.json`): the model is built on the `meta` device from its
    config, the dense weights are loaded, and every MoE layer reads its experts from the store
    (the expert parameters never enter memory). Plain `transformers` directory: converted once
    into `converted_dir` (default: `$MOE_INFER_CACHE/converted/<fingerprint>`, see
    `moe_infer.envs`) and loaded from there; with `in_memory=True` it is instead loaded whole with
    `from_pretrained` and wrapped (experts in memory, as `wrap` on a loaded model).

    `checksums` (converted checkpoints): "first" (default) checks each expert's bytes against the
    manifest the first time they are read from disk and the dense file as it loads; "every" checks
    every read; "off" skips both (saves the hashing: 0.1-0.3 of a page-cache read with xxh3_64,
    see bench/results/checksums.md), for files just checked by `verify`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not hub.is_hub_id(path):
            raise ConfigError(f"load: {path!r} is not a directory (nor a hub id such as 'org/name')")
        path = hub.resolve(path)  # the hub cache's snapshot, downloaded if it is not there
    check_field_names(fields)
    check_supported(MoEConfig().replace(**fields))
    if os.path.exists(os.path.join(path, MANIFEST)):
        if in_memory:
            raise ConfigError(f"load: {path!r} is a converted checkpoint; in_memory=True applies to plain "
                             f"transformers directories only")
        return _load_converted(path, dtype=dtype, device=device, fields=fields, checksums=checksums)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"load: {path!r} has no config.json; expected a transformers model directory or a "
                         f"converted checkpoint")
    if in_memory:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if device is not None:
            model.to(device)
        model.eval()
        return wrap(model, **fields)
    target = os.fspath(converted_dir) if converted_dir is not None else default_converted_dir(path)
    convert(path, target)
    return _load_converted(target, dtype=dtype, device=device, fields=fields, checksums=checksums)


def _load_converted(path: str, *, dtype: Any, device: str | torch.device | None, fields: dict,
                    checksums: str) -> nn.Module:
    """A wrapped model over a converted checkpoint directory (see `load`)."""
    model, store, expert_dtype = load_dense(path, dtype=dtype, device=device, checksums=checksums)
    wrap(model)  # no expert cache yet: the experts are on meta until the store serves them
    read_experts_from(model, executor(model).layers, store, device=device, dtype=expert_dtype)
    if fields:
        wrap(model, **fields)  # budgets: the tiered cache is built over the store (moe_infer.cache.setup)
    return model
