"""Importing routing logs written by other systems: the JSONL layout (``Trace.from_jsonl``).

One JSON object per line, one line per token and MoE layer::

    {"seq": 0, "pos": 5, "layer": 1, "experts": [3, 7], "weights": [0.62, 0.38], "token": 1337}

- ``seq`` (int >= 0): sequence id; ``pos`` (int >= 0): position of the token in that sequence;
- ``layer`` (int >= 0): decoder-layer index (not the index among MoE layers);
- ``experts`` (list of K distinct ints in [0, num_experts)) and ``weights`` (list of K finite
  numbers): the top-k routing of that token at that layer; K is the same on every line;
- ``token`` (int >= 0, optional): vocabulary id; missing on every line of a token means -1;
- other keys are ignored; blank lines are skipped; lines may come in any order.

Every (seq, pos) must have exactly one line for every MoE layer. The MoE layers are
``moe_layers`` when given, otherwise every ``layer`` value seen. Tokens are sorted by
(seq, pos); positions need not start at 0 or be consecutive.

`read_jsonl` parses and checks a file into the arrays of a trace; `Trace.from_jsonl` (`trace.py`)
builds and validates the `Trace` from them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_infer.errors import ConfigError

from .format import UNKNOWN_TOKEN, _check_positive_int, _is_int


def read_jsonl(
    path: Path, *, num_experts: int, moe_layers: Sequence[int] | None
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """The tensors of a trace (``expert_ids``, ``expert_weights``, ``seq_ids``, ``positions``,
    ``token_ids``) read from the JSONL log at ``path``, and its MoE layers. Errors name the file
    and line."""
    _check_positive_int("num_experts", num_experts)
    allowed_layers = None if moe_layers is None else set(moe_layers)
    # (seq, pos) -> layer -> (experts, weights, line number)
    routing: dict[tuple[int, int], dict[int, tuple[list[int], list[float], int]]] = {}
    tokens: dict[tuple[int, int], tuple[int, int]] = {}  # (seq, pos) -> (token, line number)
    top_k_line: tuple[int, int] | None = None  # (K, line number that fixed it)
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            seq, pos, layer, experts, weights, token = _parse_jsonl_record(
                line, where, num_experts
            )
            if top_k_line is None:
                top_k_line = (len(experts), line_number)
            elif len(experts) != top_k_line[0]:
                raise ConfigError(
                    f"{where}: {len(experts)} experts, but line {top_k_line[1]} has "
                    f"{top_k_line[0]}; top_k must be the same on every line"
                )
            if allowed_layers is not None and layer not in allowed_layers:
                raise ConfigError(
                    f"{where}: layer {layer} is not in moe_layers {sorted(allowed_layers)}"
                )
            by_layer = routing.setdefault((seq, pos), {})
            if layer in by_layer:
                raise ConfigError(
                    f"{where}: duplicate record for seq {seq} pos {pos} layer {layer} "
                    f"(first on line {by_layer[layer][2]})"
                )
            by_layer[layer] = (experts, weights, line_number)
            if token is not None:
                known_token, known_line = tokens.setdefault((seq, pos), (token, line_number))
                if token != known_token:
                    raise ConfigError(
                        f"{where}: token {token} for seq {seq} pos {pos}, but line "
                        f"{known_line} says {known_token}"
                    )
    if top_k_line is None:
        raise ConfigError(f"{path}: no routing records")

    layers = (
        tuple(moe_layers)
        if moe_layers is not None
        else tuple(sorted({layer for by_layer in routing.values() for layer in by_layer}))
    )
    keys = sorted(routing)
    expert_ids = np.empty((len(keys), len(layers), top_k_line[0]), dtype=np.int64)  # [N, L, K]
    expert_weights = np.empty(expert_ids.shape, dtype=np.float64)  # [N, L, K]
    for token_index, (seq, pos) in enumerate(keys):
        by_layer = routing[(seq, pos)]
        missing = [layer for layer in layers if layer not in by_layer]
        if missing:
            first_line = min(line for _, _, line in by_layer.values())
            raise ConfigError(
                f"{path}: seq {seq} pos {pos} has no record for layer(s) {missing} "
                f"(its first record is on line {first_line})"
            )
        for layer_index, layer in enumerate(layers):
            experts, weights, _ = by_layer[layer]
            expert_ids[token_index, layer_index] = experts
            expert_weights[token_index, layer_index] = weights
    arrays = {
        "expert_ids": expert_ids,
        "expert_weights": expert_weights,
        "seq_ids": np.array([seq for seq, _ in keys], dtype=np.int64),
        "positions": np.array([pos for _, pos in keys], dtype=np.int64),
        "token_ids": np.array(
            [tokens.get(key, (UNKNOWN_TOKEN, 0))[0] for key in keys], dtype=np.int64
        ),
    }
    return arrays, layers


def _parse_jsonl_record(
    line: str, where: str, num_experts: int
) -> tuple[int, int, int, list[int], list[float], int | None]:
    """One JSONL line as (seq, pos, layer, experts, weights, token or None).

    Errors cite ``where`` (file and line).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("seq", "pos", "layer", "experts", "weights") if key not in record]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    for key in ("seq", "pos", "layer", "token"):
        if key in record and not (_is_int(record[key]) and record[key] >= 0):
            raise ConfigError(f"{where}: {key} must be an int >= 0, got {record[key]!r}")
    experts, weights = record["experts"], record["weights"]
    if not (
        isinstance(experts, list)
        and experts
        and all(_is_int(expert) and 0 <= expert < num_experts for expert in experts)
        and len(set(experts)) == len(experts)
    ):
        raise ConfigError(
            f"{where}: experts must be a non-empty list of distinct ints in "
            f"[0, num_experts={num_experts}), got {experts!r}"
        )
    if not (
        isinstance(weights, list)
        and len(weights) == len(experts)
        and all(
            isinstance(weight, (int, float))
            and not isinstance(weight, bool)
            and math.isfinite(weight)
            for weight in weights
        )
    ):
        raise ConfigError(
            f"{where}: weights must be a list of {len(experts)} finite numbers (one per expert), "
            f"got {weights!r}"
        )
    return record["seq"], record["pos"], record["layer"], experts, weights, record.get("token")
