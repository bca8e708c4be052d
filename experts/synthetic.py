"""Random-weight checkpoints in the original Hugging Face hub layout, at full-size dimensions
(Mixtral-8x7B, DeepSeek-V2-Lite, Qwen3-30B-A3B, DeepSeek-V3 with FP8 blocks) and any number of
layers: the inputs of the converter and offloading benchmarks.

Owns the presets and the writer. Tensor names and shapes are not written out by hand: the model
is built on the `meta` device from the config and its state dict is mapped back to the hub layout
with `transformers`' own reverse conversion (what `save_pretrained` writes). Tensors are generated
and written one at a time into shards of at most `shard_bytes`, so memory stays at one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable

import torch

from .fp8 import scale_shape
from .skeleton import skeleton
from .tensorfile import TensorWriter
from moe_infer.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"


def _presets() -> dict[str, Callable[[int], object]]:
    import transformers as tf

    return {
        "mixtral-8x7b": lambda layers: tf.MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
            dtype="bfloat16", architectures=["MixtralForCausalLM"]),
        "deepseek-v2-lite": lambda layers: tf.DeepseekV2Config(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
            routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False, dtype="bfloat16",
            architectures=["DeepseekV2ForCausalLM"]),
        "qwen3-30b-a3b": lambda layers: tf.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False, dtype="bfloat16",
            architectures=["Qwen3MoeForCausalLM"]),
        "deepseek-v3": lambda layers: tf.DeepseekV3Config(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=layers, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
            n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=min(3, max(layers - 1, 0)),
            kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8,
            topk_group=4, routed_scaling_factor=2.5, tie_word_embeddings=False, dtype="bfloat16",
            architectures=["DeepseekV3ForCausalLM"]),
    }


PRESETS = ("mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b", "deepseek-v3")
FP8_BY_DEFAULT = {"deepseek-v3"}
# 2-D projection weights stored as FP8 in DeepSeek-V3 checkpoints (router, embeddings and norms stay high precision)
_FP8_WEIGHT = re.compile(r"_proj(_with_mqa)?\.weight$")
_LAYER = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")


def preset_config(name: str, layers: int):
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if layers < 1:
        raise ConfigError(f"layers must be >= 1, got {layers}")
    return presets[name](layers)


def hub_tensors(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor of `config`'s model in the hub layout."""
    from transformers.core_model_loading import revert_weight_conversion

    model = skeleton(config, torch.bfloat16 if getattr(config, "dtype", None) in (None, "bfloat16", torch.bfloat16)
                     else config.dtype)
    hub = revert_weight_conversion(model, model.state_dict())
    return {name: (tuple(t.shape), t.dtype) for name, t in hub.items()}


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype)
    std = 0.02 if len(shape) > 1 else 0.01
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype) if math.prod(shape) < 1 << 22 \
        else torch.randn(shape, generator=generator, dtype=dtype).mul_(std)


def _fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` [M, N] to FP8 e4m3 with per-block scales (scale = blockmax / 448)."""
    rows, cols = weight.shape
    sr, sc = scale_shape((rows, cols), block)
    scales = torch.empty((sr, sc), dtype=torch.float32)
    out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn)
    for r in range(sr):
        chunk = weight[r * block[0]:(r + 1) * block[0]].float()
        for c in range(sc):
            tile = chunk[:, c * block[1]:(c + 1) * block[1]]
            scale = tile.abs().max().clamp(min=1e-12) / 448.0
            scales[r, c] = scale
            out[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] = (tile / scale).to(torch.float8_e4m3fn)
    return out, scales


def write_synthetic(dst: str, config, *, fp8: bool = False, fp8_block: tuple[int, int] = (128, 128),
                    mtp_layer: bool = False, shard_bytes: int = 5 << 30, seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Write a random-weight checkpoint of `config` into the new directory `dst` (hub layout,
    safetensors shards + index). `fp8`: projection weights as FP8 with `weight_scale_inv` blocks
    (and a `quantization_config` in config.json). `mtp_layer`: add tensors of an extra layer with
    index num_hidden_layers, as DeepSeek-V3's multi-token-prediction layer. Returns a summary."""
    if os.path.exists(dst) and os.listdir(dst):
        raise ConfigError(f"{dst} exists and is not empty")
    os.makedirs(dst, exist_ok=True)
    tensors = hub_tensors(config)
    if mtp_layer:
        last = config.num_hidden_layers - 1
        for name, spec in list(tensors.items()):
            match = _LAYER.match(name)
            if match and int(match.group(2)) == last:
                tensors[f"{match.group(1)}{config.num_hidden_layers}{match.group(3)}"] = spec
        hidden = config.hidden_size
        tensors[f"model.layers.{config.num_hidden_layers}.eh_proj.weight"] = ((hidden, 2 * hidden), torch.bfloat16)
        tensors[f"model.layers.{config.num_hidden_layers}.enorm.weight"] = ((hidden,), torch.bfloat16)
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in sorted(tensors, key=_natural):
        shape, dtype = tensors[name]
        if fp8 and len(shape) == 2 and _FP8_WEIGHT.search(name):
            items.append((name, shape, torch.float8_e4m3fn))
            items.append((name + "_scale_inv", scale_shape(shape, fp8_block), torch.float32))
        else:
            items.append((name, shape, dtype))
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[1]) * item[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes and not item[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for shard_name, shard in zip(names, shards):
        writer = TensorWriter(os.path.join(dst, shard_name), [(n, dt, s) for n, s, dt in shard], {"format": "pt"})
        pending_scale = None
        for name, shape, dtype in shard:
            if dtype == torch.float8_e4m3fn:
                weight, pending_scale = _fp8(_random(name, shape, torch.bfloat16, generator), fp8_block)
                writer.write(name, weight)
            elif name.endswith("_scale_inv") and pending_scale is not None:
                writer.write(name, pending_scale)
                pending_scale = None
            else:
                writer.write(name, _random(name, shape, dtype, generator))
            weight_map[name] = shard_name
            nbytes = math.prod(shape) * dtype.itemsize
            total += nbytes
            if progress is not None:
                progress(nbytes)
        writer.close()
    with open(os.path.join(dst, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(dst)
    if fp8:
        with open(os.path.join(dst, "config.json")) as f:
            raw = json.load(f)
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(fp8_block)}
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)
    return {"dst": dst, "bytes": total, "shards": len(shards), "tensors": len(items)}
