"""KV-cache moves of expert-aware batching: stacking requests' caches into a micro-batch and back.

Owns a pooled request's own cache (`PooledRequest`), the `MicroBatch` that holds its members'
caches stacked and left-padded ([B, heads, S, d] per attention layer, padding masked out) and runs
one decode step of them, cutting rows out of it (a finished request is dropped; a regrouped one
gets its real tokens back as views: padding is only ever on the left), and which caches can be
moved at all (full-attention ``DynamicLayer`` caches only: `check_model`).

Shape legend: B requests in a micro-batch, S cached positions, h heads, n a request's tokens, d head size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_infer.api import is_wrapped
from moe_infer.errors import ConfigError
from moe_infer.models import cache_argument
from moe_infer.serving.schedule import SchedulerStats


@dataclass(eq=False)
class PooledRequest:
    """One request of a `DecodePool`: its prompt, token choices (`RequestSampler`) and KV cache."""

    index: int  # unique among the pool's requests (the signature source's request id)
    prompt: list[int]
    sampler: Any  # moe_infer.serving.sampling.RequestSampler
    tokens: list[int] = field(default_factory=list)  # generated so far
    cache: list[tuple[Tensor, Tensor]] | None = None  # per attention layer: keys, values [1, h, n, d]
    prefilled: int = 0  # prompt tokens in its own cache so far (chunked prefill)
    prefill_cache: Any = None  # its batch-1 DynamicCache while the prompt is going in
    done: bool = False

    @property
    def length(self) -> int:  # tokens in its KV cache once the last generated token is fed
        return len(self.prompt) + len(self.tokens) - 1


class MicroBatch:
    """Requests decoded together and their stacked, left-padded KV cache."""

    def __init__(self, requests: list[PooledRequest], model: nn.Module, stats: SchedulerStats):
        self.requests = requests
        lengths = [r.length for r in requests]
        width = max(lengths)
        layers = []
        for layer_index in range(len(requests[0].cache)):
            keys = torch.cat([left_pad(r.cache[layer_index][0], width) for r in requests])
            values = torch.cat([left_pad(r.cache[layer_index][1], width) for r in requests])
            layers.append((keys, values))
            stats.kv_bytes_moved += keys.nbytes + values.nbytes  # the copy torch.cat made
        for r in requests:
            r.cache = None
        self.cache = dynamic_cache(model, layers)
        device = layers[0][0].device
        self.mask = torch.zeros(len(requests), width, dtype=torch.long, device=device)  # [B, S]
        for row, length in enumerate(lengths):
            self.mask[row, width - length:] = 1

    def step(self, model: nn.Module) -> Tensor:
        """One decode step of every member: logits [B, V] of the next token. A step that raises leaves
        the micro-batch as it was (the layers it reached had appended a column: cut off again)."""
        device = self.mask.device
        width = self.mask.shape[1]
        input_ids = torch.tensor([[r.tokens[-1]] for r in self.requests], device=device)  # [B, 1]
        position_ids = torch.tensor([[r.length] for r in self.requests], device=device)  # [B, 1]
        mask = torch.cat([self.mask, torch.ones(len(self.requests), 1, dtype=self.mask.dtype, device=device)], 1)
        try:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        **cache_argument(model, self.cache), use_cache=True, logits_to_keep=1)
        except BaseException:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
            raise
        self.mask = mask
        return out.logits[:, -1, :].float()

    def keep(self, rows: list[int]) -> int:
        """Drop every other row; trim the columns that are padding in every remaining row. Returns the
        bytes of KV cache copied."""
        index = torch.tensor(rows, device=self.mask.device)
        self.requests = [self.requests[row] for row in rows]
        self.mask = self.mask[index]
        trim = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        copied = 0
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
            copied += layer.keys.nbytes + layer.values.nbytes
        self.mask = self.mask[:, trim:]
        return copied

    def release(self, rows: list[int]) -> tuple[list[PooledRequest], int]:
        """Hand the requests of ``rows`` their own caches back (real tokens only, as views: they are
        copied once, when stacked into their next micro-batch) and drop them. Returns them and the
        bytes copied to close the remaining rows up."""
        released = []
        for row in rows:
            request = self.requests[row]
            n = request.length
            request.cache = [(layer.keys[row:row + 1, :, -n:], layer.values[row:row + 1, :, -n:])
                             for layer in self.cache.layers]
            released.append(request)
        remaining = [row for row in range(len(self.requests)) if row not in set(rows)]
        copied = self.keep(remaining) if remaining else 0
        if not remaining:
            self.requests = []
        return released, copied


def left_pad(tensor: Tensor, width: int) -> Tensor:
    """[1, h, n, d] -> [1, h, width, d], zeros on the left (masked out by the attention mask)."""
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3]), tensor], dim=2)


def dynamic_cache(model: nn.Module, layers: list[tuple[Tensor, Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    _check_cache_layers(cache)
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.update(keys, values)
    return cache


def _check_cache_layers(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ConfigError(f"expert-aware batching (generate_many, moe-infer serve) supports models whose KV cache is "
                         f"made of full-attention DynamicLayer layers; this model's cache has {', '.join(sorted(kinds))}")


def check_model(model: nn.Module) -> None:
    """Refuse, before any work, a model the pool cannot batch: not wrapped, or with a KV cache that is
    not made of full-attention layers."""
    from transformers import DynamicCache

    if not is_wrapped(model):
        raise ConfigError("expert-aware batching (generate_many, moe-infer serve) needs a wrapped model "
                         "(moe_infer.wrap(model)): the scheduler observes routing through the MoE layers")
    _check_cache_layers(DynamicCache(config=model.config))


def cache_of(cache) -> list[tuple[Tensor, Tensor]]:
    _check_cache_layers(cache)
    return [(layer.keys, layer.values) for layer in cache.layers]
