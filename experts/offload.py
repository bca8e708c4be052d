"""The disk tier of an in-memory model (`MoEConfig.offload_dir`): its experts written once in the
converted layout (DESIGN section 5), then read back the way `moe_infer.load` reads a converted
checkpoint's.

Owns: writing an offload directory (`experts/layer_XXX.safetensors`, one contiguous byte range per
expert, and `moe_infer.json` with every expert's offset, size and sha256), deciding whether an
existing directory holds these very experts (then it is reused, nothing is written), and pointing
the layers at the store while their in-memory expert parameters are released.
Does not own reading (`moe_infer.experts.store`) or caching (`moe_infer.cache`). An offload
directory holds experts only: the model keeps its dense weights in memory, so `load` and `verify`
(which need `dense.safetensors`) do not open it.

Shape legend: E experts, H hidden, I intermediate (per expert).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from torch import nn

from .convert import PARTIAL_SUFFIX, layer_file
from .math import ExpertTensors
from .store import FORMAT, MANIFEST, OFFLOAD_SOURCE, ExpertStore, StoreExperts, dtype_name, load_manifest
from .tensorfile import FAST_HASH, TensorWriter, fast_hasher
from moe_infer.errors import ConfigError

SOURCE_KIND = OFFLOAD_SOURCE  # manifest["source"]["kind"] of a directory this module wrote


def _canonical(source, expert: int) -> list[tuple[str, torch.Tensor]]:
    """Expert `expert`'s tensors in file order: w13 [2I, H] (gate rows then up rows), w2 [H, I], biases."""
    t: ExpertTensors = source(expert).canonical()
    parts = [("w13", t.w13), ("w2", t.w2)]
    if t.b13 is not None:
        parts += [("b13", t.b13), ("b2", t.b2)]
    return [(kind, tensor.detach().cpu()) for kind, tensor in parts]


def _digest(parts: list[tuple[str, torch.Tensor]]) -> tuple[str, int]:
    digest, nbytes = hashlib.sha256(), 0
    for _, tensor in parts:
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        digest.update(data)
        nbytes += len(data)
    return digest.hexdigest(), nbytes


def _fingerprint(layers, model_name: str, digests: list[str]) -> str:
    first = layers[0]
    geometry = [model_name, first.family, [layer.layer_idx for layer in layers], first.num_experts,
                first.adapter.top_k, *digests]
    return hashlib.sha256(json.dumps(geometry).encode()).hexdigest()


def _check_layers(layers) -> torch.dtype:
    dtypes = {layer.expert_source.module.gate_up_proj.dtype for layer in layers}
    if len(dtypes) != 1:
        raise ConfigError(f"offload_dir: the MoE layers' experts have several dtypes ({sorted(map(str, dtypes))}); "
                          f"cast the model to one dtype first")
    meta = [layer.layer_idx for layer in layers if layer.expert_source.module.gate_up_proj.is_meta]
    if meta:
        raise ConfigError(f"offload_dir: the experts of MoE layers {meta} are not in memory (on the meta device)")
    return dtypes.pop()


def write_offload(layers, directory: str | os.PathLike, model_name: str = "") -> ExpertStore:
    """The experts of `layers` (in-memory `MoELayer`s) as an `ExpertStore` in `directory`.

    A directory that already holds these experts (same model, layers and bytes: the manifest's
    fingerprint) is reused as it is; an empty or missing one is written (into a temporary sibling,
    renamed at the end, so an interrupted write never leaves a directory that looks complete);
    anything else is refused with `ConfigError` and left untouched.
    """
    directory = os.fspath(directory)
    dtype = _check_layers(layers)
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        manifest = load_manifest(directory)
        digests = [_digest(_canonical(layer.expert_source, e))[0]
                   for layer in layers for e in range(layer.num_experts)]
        fingerprint = _fingerprint(layers, model_name, digests)
        source = manifest.get("source", {})
        if source.get("kind") != SOURCE_KIND or source.get("fingerprint") != fingerprint:
            raise ConfigError(f"offload_dir={directory!r} holds other experts (another model, or other weights); "
                              f"give an empty or new directory")
        return ExpertStore.open(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ConfigError(f"offload_dir={directory!r} exists and is not an empty directory nor an offload of "
                          f"this model's experts; give an empty or new directory")
    partial = directory.rstrip("/\\") + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)  # a previous interrupted write
    os.makedirs(os.path.join(partial, "experts"))
    try:
        entries = []
        for layer in layers:
            entries += _write_layer(os.path.join(partial, layer_file(layer.layer_idx)), layer)
        first = layers[0]
        manifest = {
            "format": FORMAT,
            "source": {"kind": SOURCE_KIND, "model": model_name,
                       "fingerprint": _fingerprint(layers, model_name, [entry["sha256"] for entry in entries])},
            "family": first.family,
            "dtype": dtype_name(dtype),
            "quantization": None,
            "num_experts": first.num_experts,
            "top_k": int(first.adapter.top_k),
            "hidden_size": first.expert_source.hidden_size,
            "intermediate_size": first.expert_source.intermediate_size,
            "moe_layers": [layer.layer_idx for layer in layers],
            "dense": [],  # the dense weights stay in the model's memory
            "experts": entries,
        }
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked above): the rename needs the name free
        os.rename(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExpertStore.open(directory)


def _write_layer(path: str, layer) -> list[dict]:
    source = layer.expert_source
    template = _canonical(source, 0)  # every expert of a layer has expert 0's layout
    specs = [(f"e{e}.{kind}", tensor.dtype, tuple(tensor.shape))
             for e in range(layer.num_experts) for kind, tensor in template]
    writer = TensorWriter(path, specs, {"format": "moe_infer.experts", "layer": str(layer.layer_idx)})
    entries = []
    for e in range(layer.num_experts):
        offset = writer.offsets[f"e{e}.w13"]
        digest, fast, nbytes = hashlib.sha256(), fast_hasher(), 0  # fast: what ExpertStore.read checks
        for kind, tensor in _canonical(source, e):  # one expert in memory at a time
            data = writer.write(f"e{e}.{kind}", tensor)
            digest.update(data)
            if fast is not None:
                fast.update(data)
            nbytes += len(data)
        entry = {"layer": layer.layer_idx, "expert": e, "file": layer_file(layer.layer_idx),
                 "offset": offset, "nbytes": nbytes, "sha256": digest.hexdigest()}
        if fast is not None:
            entry[FAST_HASH] = fast.hexdigest()
        entries.append(entry)
    writer.close()
    return entries


def offload_layers(layers, directory: str | os.PathLike, model_name: str = "") -> ExpertStore:
    """Write (or reuse) the offload directory of `layers`, then make every layer read its experts
    from it (`StoreExperts`, on the device and in the dtype the experts had) and release the
    in-memory expert parameters (moved to `meta`, as in a model `load`ed from a converted
    checkpoint). Nothing changes in the layers when writing fails."""
    store = write_offload(layers, directory, model_name)
    for layer in layers:
        module_source = layer.expert_source
        layer.expert_source = StoreExperts(store, layer.layer_idx, module_source.activation,
                                           device=module_source.device,
                                           dtype=module_source.module.gate_up_proj.dtype)
        experts = module_source.module
        for name, param in list(experts._parameters.items()):
            if param is not None and not param.is_meta:
                experts._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
    return store


__all__ = ["SOURCE_KIND", "offload_layers", "write_offload"]
