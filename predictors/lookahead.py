"""Attention lookahead: an estimate of the next MoE layer's input, made at this MoE layer's router.

When MoE layer p routes, the next MoE layer's input is not known: it adds this block's output and
the next decoder layer's attention. On the shipped tiny models the attention is what matters:
applying layer p+1's router to layer p's input finds about half of its experts, and adding this
block's true output changes little, while running layer p+1's attention on the residual stream
finds most of them (measured in ``bench/results/predictors.md``, row "expertflow (attention
lookahead)").

``AttentionLookahead`` therefore estimates layer p+1's MoE input as a standard pre-norm decoder
layer would compute it, with this block's routed experts left out (they are what is being
predicted, and their weights may not be resident):

    r = residual stream before block p + block p's shared experts(x_p)
    x_{p+1} ~ post_attention_layernorm_{p+1}(r + self_attn_{p+1}(input_layernorm_{p+1}(r)))

The attention reads the call's KV cache without writing to it, with the position embeddings and
mask of the current call (captured from decoder layer p's arguments). In a prefill call every
token of the call is estimated this way; in decode the earlier tokens' keys and values are exact.
The cost per token is one extra attention (and shared-experts) pass per MoE layer.

It needs consecutive MoE decoder layers with ``input_layernorm``, ``self_attn`` and
``post_attention_layernorm`` joined by plain residual connections, full attention in each (not
GPT-OSS's or EXAONE's sliding windows, nor DeepSeek-V3.2's indexer), and a ``DynamicCache`` (or
none); otherwise it refuses with ``ValueError``. ``tests/test_lookahead.py`` checks every family
moe_infer wraps: the estimate is exact (equal to the next MoE input with this block's routed
experts left out) for Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, dots1, HunYuan,
ERNIE-4.5, PhiMoE and MiniMax-M2, and the others are refused.

Shape legend: B rows, S tokens per row, T = B * S, H hidden size, E experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache
from moe_infer.errors import ConfigError

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm")


class AttentionLookahead:
    """Hooks on a model's MoE decoder layers that estimate the next MoE layer's input.

    ``layers`` are the model's MoE blocks, first to last: a running executor's ``MoELayer`` objects,
    or ``moe_infer.predictors.blocks.moe_blocks(model)`` offline (what is read of each: ``block_name``,
    ``layer_idx``, ``route``, ``shared_output``, ``num_experts``, ``hidden_size``, ``named_parameters``)."""

    def __init__(self, model: nn.Module, layers: list):
        self.layers = list(layers)
        indices = [layer.layer_idx for layer in self.layers]
        if any(b - a != 1 for a, b in zip(indices, indices[1:])):
            raise ConfigError(f"attention lookahead needs consecutive MoE layers; the model's are {indices}")
        config = getattr(model, "config", None)
        layer_types = getattr(config, "layer_types", None)
        kinds = {layer_types[i] for i in indices} if layer_types else set()
        if kinds - {"full_attention"} or (not layer_types and getattr(config, "sliding_window", None)):
            raise ConfigError("attention lookahead needs full attention in every MoE layer; the model's MoE layers "
                             f"have {sorted(kinds) or ['sliding_attention']}")
        if getattr(config, "residual_multiplier", 1.0) != 1.0:
            raise ConfigError("attention lookahead needs plain residual connections; the model scales them by "
                             f"residual_multiplier={config.residual_multiplier}")
        self.decoders = []
        for layer in self.layers:
            parent = layer.block_name.rpartition(".")[0]
            decoder = model.get_submodule(parent)
            missing = [part for part in PARTS if not hasattr(decoder, part)]
            if missing:
                raise ConfigError(f"attention lookahead needs pre-norm decoder layers with {', '.join(PARTS)}; "
                                 f"{parent} ({type(decoder).__name__}) has no {', '.join(missing)}")
            if getattr(decoder.self_attn, "sliding_window", None) or hasattr(decoder.self_attn, "indexer"):
                raise ConfigError(f"attention lookahead needs full attention in every MoE layer; {parent}.self_attn "
                                 "attends through a sliding window or a sparse indexer")
            self.decoders.append(decoder)
        self._kwargs: dict[int, dict[str, Any]] = {}  # position -> decoder keyword arguments of this call
        self._residual: dict[int, torch.Tensor] = {}  # position -> [B, S, H] residual stream before the block
        self._handles = []
        for position, decoder in enumerate(self.decoders):
            self._handles.append(decoder.register_forward_pre_hook(
                lambda module, args, kwargs, p=position: self._see_call(p, kwargs), with_kwargs=True))
            self._handles.append(decoder.post_attention_layernorm.register_forward_pre_hook(
                lambda module, args, p=position: self._see_residual(p, args[0])))

    def _see_call(self, position: int, kwargs: dict[str, Any]) -> None:
        self._kwargs[position] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def _see_residual(self, position: int, residual: torch.Tensor) -> None:
        self._residual[position] = residual

    @torch.inference_mode()
    def estimate(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H]: the estimated MoE input of layer position + 1, from this call's residual stream
        before block ``position`` and the block's input ``hidden`` [T, H]."""
        if position + 1 >= len(self.layers):
            raise ConfigError(f"layer {position} is the last MoE layer: there is no next one to estimate")
        if position not in self._residual:
            raise RuntimeError(f"attention lookahead saw no call of MoE layer {position}'s decoder layer")
        residual = self._residual[position]
        shared = self.layers[position].shared_output(hidden)
        if shared is not None:
            residual = residual + shared.reshape(residual.shape).to(residual.dtype)
        decoder = self.decoders[position + 1]
        # the KV cache argument is `cache` from transformers 5.24 on, `past_key_values` before it
        kwargs = {k: ReadOnlyCache(v) if isinstance(v, Cache) else v for k, v in self._kwargs[position].items()}
        attended = decoder.self_attn(hidden_states=decoder.input_layernorm(residual), **kwargs)
        if isinstance(attended, tuple):
            attended = attended[0]
        out = decoder.post_attention_layernorm(residual + attended)
        return out.reshape(-1, out.shape[-1])

    @torch.inference_mode()
    def features(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H + E] float32: ``estimate(position, hidden)`` and, multi-hot, the experts layer
        position + 1's router picks for it (what an ``expertflow`` predictor with ``lookahead`` reads)."""
        estimate = self.estimate(position, hidden)
        layer = self.layers[position + 1]
        chosen = layer.route(estimate).expert_ids.long()
        hot = torch.zeros(estimate.shape[0], layer.num_experts, device=estimate.device)
        hot.scatter_(1, chosen, 1.0)
        return torch.cat([estimate.float(), hot], 1)

    def macs_per_token(self) -> int:
        """Parameter MACs per token of the estimates of every MoE layer but the first: the next layer's
        attention projections, this block's shared experts and the next router (attention scores,
        which grow with the context, are not counted)."""
        total = 0
        for position in range(len(self.layers) - 1):
            nxt = self.layers[position + 1]
            shared = sum(p.numel() for name, p in self.layers[position].named_parameters()
                         if "shared" in name)
            total += (sum(p.numel() for p in self.decoders[position + 1].self_attn.parameters() if p.dim() > 1)
                      + shared + nxt.hidden_size * nxt.num_experts)
        return total

    def end_call(self) -> None:
        self._kwargs.clear()
        self._residual.clear()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.end_call()


class ReadOnlyCache:
    """A view of a ``transformers`` ``DynamicCache`` whose ``update`` returns the cached keys and
    values with the new ones appended, and stores nothing."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        layers = getattr(self._cache, "layers", None)
        if layers is None or layer_idx >= len(layers):
            raise ConfigError(f"attention lookahead cannot read a {type(self._cache).__name__}: it needs a "
                             "transformers DynamicCache")
        layer = layers[layer_idx]
        if type(layer).__name__ != "DynamicLayer":
            raise ConfigError(f"attention lookahead reads full-attention DynamicCache layers only; layer {layer_idx} "
                             f"is a {type(layer).__name__}")
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            return keys, values
        return torch.cat([layer.keys, keys], -2), torch.cat([layer.values, values], -2)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)
