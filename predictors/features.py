"""Predictor inputs computed from a trace: token windows, earlier tokens' routing, MoE-layer inputs.

This module owns turning a ``Trace`` into the arrays predictors read, with the causal rule of
``moe_infer.predictors.base`` (nothing of a later token, nothing of a later layer). MoE-layer inputs
(hidden states) come from the trace's recorded ``moe_input:<layer>`` features when every MoE layer
was recorded (``moe-infer profile --features moe_input:0,...``), otherwise from running the model
over the trace's token ids.

Shape legend: N tokens, L MoE layers, K top-k, E experts, H hidden size, W window width.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from moe_infer.predictors.blocks import moe_blocks
from moe_infer.predictors.lookahead import AttentionLookahead
from moe_infer.predictors.progress import bar
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError

PAD_TOKEN = -1  # a window slot before the start of the sequence


def same_sequence_offsets(trace: Trace, offset: int) -> np.ndarray:
    """[N] bool: token ``n - offset`` exists and belongs to the sequence of token ``n``."""
    seq_ids = trace.seq_ids.numpy()
    valid = np.zeros(trace.num_tokens, dtype=bool)
    if offset < trace.num_tokens:
        valid[offset:] = seq_ids[offset:] == seq_ids[:len(seq_ids) - offset]
    return valid


def token_windows(trace: Trace, width: int, lookahead: int = 0) -> np.ndarray:
    """[N, W] int64: ids of tokens ``n - lookahead - W + 1 .. n - lookahead`` (oldest first) of the
    token's own sequence, ``PAD_TOKEN`` before the sequence start."""
    token_ids = trace.token_ids.numpy().astype(np.int64)
    windows = np.full((trace.num_tokens, width), PAD_TOKEN, dtype=np.int64)
    for slot in range(width):
        offset = lookahead + width - 1 - slot
        valid = same_sequence_offsets(trace, offset)
        windows[valid, slot] = token_ids[np.flatnonzero(valid) - offset]
    return windows


def previous_routing(trace: Trace) -> np.ndarray:
    """[N, L, K] int64: the routing of the previous token of the same sequence, -1 at its start."""
    expert_ids = trace.expert_ids.numpy().astype(np.int64)
    previous = np.full_like(expert_ids, -1)
    valid = same_sequence_offsets(trace, 1)
    previous[valid] = expert_ids[np.flatnonzero(valid) - 1]
    return previous


def multi_hot(expert_ids: np.ndarray | torch.Tensor, num_experts: int) -> np.ndarray:
    """[..., E] float32 with 1 at every id of ``expert_ids`` [..., K]; ids < 0 are ignored."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    out = np.zeros((*ids.shape[:-1], num_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(ids < 0, num_experts, ids), 1.0, axis=-1)
    return out[..., :num_experts]


def routing_targets(trace: Trace) -> np.ndarray:
    """[N, L, E] float32: each token's routing as a distribution over experts (its top-k weights,
    renormalised; equal shares where the weights do not sum to a positive number)."""
    weights = trace.expert_weights.numpy().astype(np.float32)
    weights = np.abs(weights)
    total = weights.sum(-1, keepdims=True)
    weights = np.where(total > 0, weights / np.maximum(total, 1e-12), 1.0 / trace.top_k)
    out = np.zeros((*weights.shape[:-1], trace.num_experts), dtype=np.float32)
    np.put_along_axis(out, trace.expert_ids.numpy().astype(np.int64), weights, axis=-1)
    return out


MIN_GROUP_EVIDENCE = 1000  # (token, layer) pairs a group limit must hold on before it is trusted


def group_limit(trace: Trace) -> list[int] | None:
    """[groups, keep] if every token's experts at every layer lie in at most ``keep`` of ``groups``
    equal blocks of consecutive expert ids with ``keep < min(groups, K)`` -- a group-limited router
    (DeepSeek-V3's ``n_group`` / ``topk_group``) read off the routing itself -- else None.

    Of the limits that hold, the one that leaves the fewest experts (``keep * E / groups``) wins;
    traces with fewer than ``MIN_GROUP_EVIDENCE`` (token, layer) pairs give None.
    """
    expert_ids = trace.expert_ids.numpy().astype(np.int64).reshape(-1, trace.top_k)  # [N*L, K]
    if len(expert_ids) < MIN_GROUP_EVIDENCE or trace.top_k < 2:
        return None
    best = None
    for groups in range(2, trace.num_experts):
        if trace.num_experts % groups:
            continue
        used = multi_hot(expert_ids // (trace.num_experts // groups), groups)  # [N*L, groups]
        keep = int(used.sum(-1).max())
        if keep < min(groups, trace.top_k):
            left = keep * trace.num_experts // groups
            if best is None or left < best[2]:
                best = (groups, keep, left)
    return None if best is None else [best[0], best[1]]


def recorded_moe_inputs(trace: Trace) -> np.ndarray | None:
    """[N, L, H] float16 (as recorded) from the trace's ``moe_input:<layer>`` features, or None if
    any MoE layer was not recorded."""
    if trace.features is None or trace.feature_names is None:
        return None
    columns = [trace.feature_names.get(f"moe_input:{layer}") for layer in trace.moe_layers]
    if any(column is None for column in columns):
        return None
    features = trace.features.numpy()
    return np.stack([features[:, start:end] for start, end in columns], 1)


def recorded_embeddings(trace: Trace) -> np.ndarray | None:
    """[N, H] float32 from the trace's ``embedding`` feature, or None."""
    if trace.features is None or trace.feature_names is None or "embedding" not in trace.feature_names:
        return None
    start, end = trace.feature_names["embedding"]
    return trace.features.numpy()[:, start:end].astype(np.float32)


class ModelFeatures(NamedTuple):
    """What running the model over a trace gives (``model_features``), float32 unless noted."""

    hidden: np.ndarray  # [N, L, H] MoE-layer inputs
    embeddings: np.ndarray  # [N, H] token embeddings
    lookahead: np.ndarray | None  # [N, L, H + E] float16 attention-lookahead features (layer 0: zeros)
    lookahead_macs: int = 0  # AttentionLookahead.macs_per_token of the model


def model_moe_inputs(trace: Trace, model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(MoE-layer inputs [N, L, H], token embeddings [N, H]) of ``model_features``."""
    features = model_features(trace, model)
    return features.hidden, features.embeddings


@torch.inference_mode()
def model_features(trace: Trace, model: torch.nn.Module, *, attention_lookahead: bool = False) -> ModelFeatures:
    """Run ``model`` over every sequence of ``trace`` (teacher forcing, as the profiler's prefill
    mode) and collect its MoE-layer inputs and token embeddings, and with ``attention_lookahead``
    each layer's ``AttentionLookahead.features`` as estimated at the layer before
    (``moe_infer.predictors.lookahead``).

    The model runs as it is, wrapped or not: a forward pre-hook on each MoE block
    (``moe_infer.predictors.blocks.moe_blocks``) sees its input and routes it with the block's
    router adapter. The model must be the trace's model: its routing is compared with the trace's
    and a mismatch raises ``ValueError``.
    """
    if int(trace.token_ids.min()) < 0:
        raise ConfigError("the trace has unknown token ids (-1): hidden states cannot be recomputed; "
                         "record it with `moe-infer profile --features moe_input:...`")
    blocks = moe_blocks(model)
    indices = [block.layer_idx for block in blocks]
    if indices != list(trace.moe_layers):
        raise ConfigError(f"the model's MoE layers {indices} are not the trace's {list(trace.moe_layers)}")
    num_layers = len(blocks)
    lookahead = AttentionLookahead(model, blocks) if attention_lookahead else None
    macs = lookahead.macs_per_token() if lookahead is not None else 0
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def see_input(position: int, args: tuple, kwargs: dict) -> None:
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden = states.reshape(-1, states.shape[-1])  # [T, H], as the block routes it
        captured["hidden", position] = hidden.float().cpu()
        captured["routing", position] = blocks[position].route(hidden).expert_ids.cpu()
        if lookahead is not None:
            if position + 1 < num_layers:
                captured["lookahead", position + 1] = lookahead.features(position, hidden).half().cpu()
            else:
                lookahead.end_call()

    handles = [model.get_submodule(block.block_name).register_forward_pre_hook(
        lambda module, args, kwargs, p=position: see_input(p, args, kwargs), with_kwargs=True)
        for position, block in enumerate(blocks)]
    device = model.get_input_embeddings().weight.device
    parts: dict[str, list[torch.Tensor]] = {"hidden": [], "embeddings": [], "lookahead": []}
    agree = 0  # (token, layer) pairs routed as in the trace
    token_ids = trace.token_ids.to(torch.long)
    starts = [0, *(np.flatnonzero(np.diff(trace.seq_ids.numpy())) + 1).tolist(), trace.num_tokens]
    progress = bar(trace.num_tokens, "tok", "model features")
    try:
        for start, end in zip(starts[:-1], starts[1:]):
            progress.update(end - start)
            ids = token_ids[start:end][None].to(device)  # [1, S]
            captured.clear()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            routed = torch.stack([captured["routing", i] for i in range(num_layers)], 1)  # [S, L, K]
            agree += int((routed.sort(-1).values.to(torch.int32)
                          == trace.expert_ids[start:end].sort(-1).values).all(-1).sum())
            parts["hidden"].append(torch.stack([captured["hidden", i] for i in range(num_layers)], 1))
            parts["embeddings"].append(model.get_input_embeddings()(ids[0]).float().cpu())
            if lookahead is not None:
                first = torch.zeros_like(captured["lookahead", 1])
                parts["lookahead"].append(torch.stack(
                    [first, *(captured["lookahead", i] for i in range(1, num_layers))], 1))
    finally:
        progress.close()
        for handle in handles:
            handle.remove()
        if lookahead is not None:
            lookahead.detach()
    # batching and padding in the profiler can flip near-ties; another model disagrees broadly
    agreement = agree / max(trace.num_tokens * trace.num_layers, 1)
    if agreement < 0.99:
        raise ConfigError(f"the model routes only {agreement:.1%} of the trace's (token, layer) pairs as the "
                         "trace does: it is not the trace's model")
    return ModelFeatures(torch.cat(parts["hidden"]).numpy(), torch.cat(parts["embeddings"]).numpy(),
                         torch.cat(parts["lookahead"]).numpy() if lookahead is not None else None, macs)
