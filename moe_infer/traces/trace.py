"""Expert-routing traces: the ``moe_infer.trace/1`` file format and the ``Trace`` class.

This module owns reading, writing, validating, combining and splitting traces, and building one
from routing logs written by other systems (``Trace.from_jsonl``). The format's names, file dtypes
and header checks are in `format.py`; parsing the JSONL layout is in `jsonl.py`. It does not
record traces (the profiler does), train predictors or simulate caches; those consume ``Trace``.

File layout (one ``.safetensors`` file, DESIGN section 5)
---------------------------------------------------------
Tensors (N tokens, L MoE layers, K = top_k, E experts, F feature columns):

==================  ========  =========  ==================================================
name                dtype     shape      meaning
==================  ========  =========  ==================================================
``expert_ids``      int32     [N, L, K]  experts chosen per token and layer, in [0, E),
                                         distinct within one token's top-k; no padding
``expert_weights``  float32   [N, L, K]  combine weight of each chosen expert, finite
``seq_ids``         int32     [N]        sequence of each token, >= 0
``positions``       int32     [N]        position of each token in its sequence, >= 0
``token_ids``       int32     [N]        vocabulary id, or -1 (``UNKNOWN_TOKEN``) when the
                                         source did not record it
``router_logits``   float16   [N, L, E]  optional: raw router logits
``features``        float16   [N, F]     optional: predictor inputs (embeddings, hidden states)
==================  ========  =========  ==================================================

String metadata: ``format`` = ``"moe_infer.trace/1"``, ``model``, ``family``, ``num_experts``
and ``top_k`` (decimal integers), ``moe_layers`` (JSON list of the decoder-layer indices of the L
axis, strictly increasing), ``source`` (what text produced the trace). Optional:
``feature_names``, a JSON object naming column ranges ``[start, end)`` of ``features``, e.g.
``{"embedding": [0, 64], "hidden_l0": [64, 128]}``. Unknown metadata keys are ignored; unknown
tensors are rejected (they would be lost on the next save).

Invariant: the tokens of one sequence form one contiguous run with strictly increasing
positions. Runs need not be sorted by ``seq_id``.

Routing logs of other systems are imported with ``Trace.from_jsonl``; their layout (one JSON
object per token and MoE layer) is documented in `jsonl.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from moe_infer.files import save_safetensors
from moe_infer.errors import ConfigError

from .format import (
    _INT32,
    _OPTIONAL_TENSOR_DTYPES,
    _TENSOR_DTYPES,
    FORMAT,
    UNKNOWN_TOKEN,
    _check_file_header,
    _check_positive_int,
    _dtype_name,
    _is_int,
    _parse_metadata,
    _to_file_dtype,
)
from .jsonl import read_jsonl

# Shapes: N tokens, L MoE layers, K top-k (experts per token), E experts, F feature columns,
# S sequences.


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Trace:
    """The routing of every token through every MoE layer of one model, plus optional inputs.

    Build one with ``from_arrays`` (casts to the file dtypes), ``load``, ``from_jsonl`` or
    ``concat``; the constructor requires the exact file dtypes. Every constructor validates the
    whole trace and raises ``ValueError`` naming the tensor, what it expected and what it got.
    """

    expert_ids: torch.Tensor  # [N, L, K] int32
    expert_weights: torch.Tensor  # [N, L, K] float32
    seq_ids: torch.Tensor  # [N] int32
    positions: torch.Tensor  # [N] int32
    token_ids: torch.Tensor  # [N] int32, UNKNOWN_TOKEN where not recorded
    num_experts: int
    moe_layers: tuple[int, ...]
    model: str = ""
    family: str = ""
    source: str = ""
    router_logits: torch.Tensor | None = None  # [N, L, E] float16
    features: torch.Tensor | None = None  # [N, F] float16
    feature_names: Mapping[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        self._check_metadata()
        self._check_tensors()
        self._check_values()
        self._check_sequences()

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_arrays(
        cls,
        *,
        expert_ids: torch.Tensor | np.ndarray,
        expert_weights: torch.Tensor | np.ndarray,
        seq_ids: torch.Tensor | np.ndarray,
        positions: torch.Tensor | np.ndarray,
        token_ids: torch.Tensor | np.ndarray,
        num_experts: int,
        moe_layers: Sequence[int],
        model: str = "",
        family: str = "",
        source: str = "",
        router_logits: torch.Tensor | np.ndarray | None = None,
        features: torch.Tensor | np.ndarray | None = None,
        feature_names: Mapping[str, Sequence[int]] | None = None,
    ) -> Trace:
        """Build a trace from torch tensors or numpy arrays on any device.

        Integer arrays become int32 (values must fit), floating arrays become float32 or
        float16 as the format says (values must not overflow). Floating ids, integer weights
        and booleans are rejected rather than guessed at.
        """
        arrays = {
            "expert_ids": expert_ids,
            "expert_weights": expert_weights,
            "seq_ids": seq_ids,
            "positions": positions,
            "token_ids": token_ids,
            "router_logits": router_logits,
            "features": features,
        }
        tensors = {
            name: _to_file_dtype(name, array) for name, array in arrays.items() if array is not None
        }
        return cls(
            **tensors,
            num_experts=num_experts,
            moe_layers=moe_layers,
            model=model,
            family=family,
            source=source,
            feature_names=feature_names,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read and validate a ``moe_infer.trace/1`` file; every error names ``path``."""
        path = Path(path)
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                _check_file_header(path, metadata, set(file.keys()))
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except SafetensorError as error:
            raise ConfigError(
                f"{path}: truncated or not a safetensors trace file ({error})"
            ) from error
        num_experts = _parse_metadata(path, metadata, "num_experts", int)
        top_k = _parse_metadata(path, metadata, "top_k", int)
        moe_layers = _parse_metadata(path, metadata, "moe_layers", json.loads)
        feature_names = (
            _parse_metadata(path, metadata, "feature_names", json.loads)
            if "feature_names" in metadata
            else None
        )
        try:
            trace = cls(
                **tensors,
                num_experts=num_experts,
                moe_layers=moe_layers,
                model=metadata["model"],
                family=metadata["family"],
                source=metadata["source"],
                feature_names=feature_names,
            )
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{path}: {error}") from error
        if trace.top_k != top_k:
            raise ConfigError(
                f"{path}: metadata top_k={top_k} but expert_ids has shape "
                f"{list(trace.expert_ids.shape)} (K={trace.top_k})"
            )
        return trace

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        *,
        num_experts: int,
        moe_layers: Sequence[int] | None = None,
        model: str = "",
        family: str = "",
        source: str | None = None,
    ) -> Trace:
        """Import a routing log in the JSONL layout of the module docstring.

        ``source`` defaults to ``"jsonl:<file name>"``. Errors name the file and line.
        """
        path = Path(path)
        arrays, layers = read_jsonl(path, num_experts=num_experts, moe_layers=moe_layers)
        try:
            return cls.from_arrays(
                **arrays,
                num_experts=num_experts,
                moe_layers=layers,
                model=model,
                family=family,
                source=f"jsonl:{path.name}" if source is None else source,
            )
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from error

    @classmethod
    def concat(cls, traces: Sequence[Trace]) -> Trace:
        """Join traces of the same model and routing shape into one.

        ``model``, ``family``, ``num_experts``, ``top_k`` and ``moe_layers`` must agree. The
        seq_ids of each trace after the first are offset past every earlier id, so sequences
        stay distinct. An optional tensor must be present in all traces or in none: a
        ``ValueError`` says which traces lack it (drop it explicitly with
        ``dataclasses.replace(trace, router_logits=None)``). ``source`` becomes the distinct
        sources joined by newlines.
        """
        traces = list(traces)
        if not traces:
            raise ConfigError("concat needs at least one trace, got none")
        first = traces[0]
        for index, trace in enumerate(traces[1:], 1):
            for attribute in ("model", "family", "num_experts", "top_k", "moe_layers"):
                if getattr(trace, attribute) != getattr(first, attribute):
                    raise ConfigError(
                        f"concat: trace {index} has {attribute}={getattr(trace, attribute)!r}, "
                        f"trace 0 has {getattr(first, attribute)!r}"
                    )
        for name in _OPTIONAL_TENSOR_DTYPES:
            holders = [
                index for index, trace in enumerate(traces) if getattr(trace, name) is not None
            ]
            if holders and len(holders) != len(traces):
                lacking = [index for index in range(len(traces)) if index not in holders]
                raise ConfigError(
                    f"concat: {name} is present in traces {holders} but missing in {lacking}; "
                    f"drop it with dataclasses.replace(trace, {name}=None) first"
                )
        if first.features is not None:
            for index, trace in enumerate(traces[1:], 1):
                if (trace.features.shape[1], trace.feature_names) != (
                    first.features.shape[1],
                    first.feature_names,
                ):
                    raise ConfigError(
                        f"concat: trace {index} has features [N, {trace.features.shape[1]}] "
                        f"named {trace.feature_names}, trace 0 has "
                        f"[N, {first.features.shape[1]}] named {first.feature_names}"
                    )

        offset_seq_ids = []  # per trace: [N_i] int64
        next_free_seq_id = 0
        for trace in traces:
            offset_seq_ids.append(trace.seq_ids.to(torch.int64) + next_free_seq_id)
            if trace.num_tokens:
                next_free_seq_id = int(offset_seq_ids[-1].max()) + 1
        if next_free_seq_id - 1 > _INT32.max:
            raise ConfigError(f"concat: offset seq_ids reach {next_free_seq_id - 1}, beyond int32")
        tensors = {
            name: torch.cat([getattr(trace, name) for trace in traces])
            for name in _TENSOR_DTYPES
            if getattr(first, name) is not None
        }
        tensors["seq_ids"] = torch.cat(offset_seq_ids).to(torch.int32)
        sources = list(dict.fromkeys(trace.source for trace in traces))
        return dataclasses.replace(first, **tensors, source="\n".join(sources))

    # ----------------------------------------------------------------- writing

    def metadata(self) -> dict[str, str]:
        """The string metadata written to the file header."""
        metadata = {
            "format": FORMAT,
            "model": self.model,
            "family": self.family,
            "num_experts": str(self.num_experts),
            "top_k": str(self.top_k),
            "moe_layers": json.dumps(list(self.moe_layers)),
            "source": self.source,
        }
        if self.feature_names is not None:
            metadata["feature_names"] = json.dumps(
                {name: list(columns) for name, columns in self.feature_names.items()}
            )
        return metadata

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        tensors = {
            name: getattr(self, name).contiguous()
            for name in _TENSOR_DTYPES
            if getattr(self, name) is not None
        }
        save_safetensors(tensors, path, self.metadata())

    # ----------------------------------------------------------------- shape and sequences

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self._sequence_starts())

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        optional = [name for name in _OPTIONAL_TENSOR_DTYPES if getattr(self, name) is not None]
        return (
            f"Trace(model={self.model!r}, family={self.family!r}, tokens={self.num_tokens}, "
            f"sequences={self.num_sequences}, layers={self.num_layers}, top_k={self.top_k}, "
            f"num_experts={self.num_experts}, optional={optional})"
        )

    def sequences(self) -> Iterator[tuple[int, slice]]:
        """Yield ``(seq_id, token slice)`` for each sequence, in the order they are stored."""
        starts = self._sequence_starts().tolist()
        seq_ids = self.seq_ids[starts].tolist()
        ends = starts[1:] + [self.num_tokens] if starts else []
        for seq_id, start, end in zip(seq_ids, starts, ends, strict=True):
            yield seq_id, slice(start, end)

    def select_sequences(self, seq_ids: Iterable[int]) -> Trace:
        """The trace restricted to ``seq_ids`` (kept in stored order, ids unchanged)."""
        wanted = sorted({int(seq_id) for seq_id in seq_ids})
        present = {seq_id for seq_id, _ in self.sequences()}
        unknown = [seq_id for seq_id in wanted if seq_id not in present]
        if unknown:
            raise ConfigError(
                f"select_sequences: seq ids {unknown[:10]} are not in this trace "
                f"({len(present)} sequences)"
            )
        keep = torch.isin(self.seq_ids, torch.tensor(wanted, dtype=torch.int32))  # [N] bool
        return dataclasses.replace(
            self,
            **{
                name: getattr(self, name)[keep]
                for name in _TENSOR_DTYPES
                if getattr(self, name) is not None
            },
        )

    def split(self, held_out_fraction: float, seed: int = 0) -> tuple[Trace, Trace]:
        """Split by sequence into ``(kept, held_out)``, deterministically.

        ``round(held_out_fraction * S)`` sequences (at least 1, at most S - 1) are held out:
        those whose ``blake2b(f"{seed}:{seq_id}")`` sorts first. The result depends only on
        the seed and the set of seq ids, not on the storage order or on library versions.
        """
        if not 0.0 < held_out_fraction < 1.0:
            raise ConfigError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        seq_ids = [seq_id for seq_id, _ in self.sequences()]
        if len(seq_ids) < 2:
            raise ConfigError(f"split needs at least 2 sequences, the trace has {len(seq_ids)}")
        num_held_out = min(max(round(held_out_fraction * len(seq_ids)), 1), len(seq_ids) - 1)
        ranked = sorted(
            seq_ids,
            key=lambda seq_id: hashlib.blake2b(f"{seed}:{seq_id}".encode(), digest_size=8).digest(),
        )
        held_out = set(ranked[:num_held_out])
        kept = [seq_id for seq_id in seq_ids if seq_id not in held_out]
        return self.select_sequences(kept), self.select_sequences(held_out)

    def _sequence_starts(self) -> torch.Tensor:
        """Index of the first token of each run of equal seq_ids: [S] int64."""
        if self.num_tokens == 0:
            return torch.zeros(0, dtype=torch.int64)
        changes = (self.seq_ids[1:] != self.seq_ids[:-1]).nonzero().flatten() + 1
        return torch.cat([torch.zeros(1, dtype=torch.int64), changes])

    # ----------------------------------------------------------------- validation

    def _check_metadata(self) -> None:
        _check_positive_int("num_experts", self.num_experts)
        object.__setattr__(self, "num_experts", int(self.num_experts))
        for name in ("model", "family", "source"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        layers = self.moe_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, np.ndarray)):
            raise TypeError(f"moe_layers must be a sequence of ints, got {layers!r}")
        if not all(_is_int(layer) for layer in layers):
            raise TypeError(f"moe_layers must hold ints, got {list(layers)!r}")
        layers = tuple(int(layer) for layer in layers)
        if not layers or layers[0] < 0 or any(b <= a for a, b in itertools.pairwise(layers)):
            raise ConfigError(
                "moe_layers must be non-empty, non-negative decoder-layer indices in strictly "
                f"increasing order, got {list(layers)}"
            )
        object.__setattr__(self, "moe_layers", layers)

    def _check_tensors(self) -> None:
        for name, dtype in _TENSOR_DTYPES.items():
            tensor = getattr(self, name)
            if tensor is None and name in _OPTIONAL_TENSOR_DTYPES:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != dtype:
                raise ConfigError(
                    f"{name}: expected dtype {_dtype_name(dtype)}, got {_dtype_name(tensor.dtype)}"
                )
        if self.expert_ids.ndim != 3:
            raise ConfigError(
                f"expert_ids: expected shape [N, L, K], got {list(self.expert_ids.shape)}"
            )
        num_tokens, num_layers, top_k = self.expert_ids.shape
        if num_layers != len(self.moe_layers):
            raise ConfigError(
                f"expert_ids: shape {list(self.expert_ids.shape)} has L={num_layers} layers, "
                f"but moe_layers lists {len(self.moe_layers)}: {list(self.moe_layers)}"
            )
        if not 1 <= top_k <= self.num_experts:
            raise ConfigError(
                f"expert_ids: shape {list(self.expert_ids.shape)} has K={top_k}, expected "
                f"1 <= K <= num_experts={self.num_experts}"
            )
        expected_shapes = {
            "expert_weights": ((num_tokens, num_layers, top_k), "[N, L, K]"),
            "seq_ids": ((num_tokens,), "[N]"),
            "positions": ((num_tokens,), "[N]"),
            "token_ids": ((num_tokens,), "[N]"),
            "router_logits": ((num_tokens, num_layers, self.num_experts), "[N, L, E]"),
        }
        for name, (shape, legend) in expected_shapes.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ConfigError(
                    f"{name}: expected shape {legend} = {list(shape)} (from expert_ids "
                    f"{list(self.expert_ids.shape)} and num_experts={self.num_experts}), "
                    f"got {list(tensor.shape)}"
                )
        if self.features is not None and (
            self.features.ndim != 2 or self.features.shape[0] != num_tokens
        ):
            raise ConfigError(
                f"features: expected shape [N, F] with N={num_tokens}, "
                f"got {list(self.features.shape)}"
            )
        self._check_feature_names()

    def _check_feature_names(self) -> None:
        if self.feature_names is None:
            return
        if self.features is None:
            raise ConfigError("feature_names given without features")
        if not isinstance(self.feature_names, Mapping):
            raise TypeError(
                f"feature_names must map names to [start, end) column ranges, "
                f"got {self.feature_names!r}"
            )
        width = self.features.shape[1]
        ranges = {}
        for name, columns in self.feature_names.items():
            if not (
                isinstance(name, str)
                and isinstance(columns, Sequence)
                and len(columns) == 2
                and all(_is_int(column) for column in columns)
                and 0 <= columns[0] < columns[1] <= width
            ):
                raise ConfigError(
                    f"feature_names: {name!r} -> {columns!r} is not a column range "
                    f"[start, end) with 0 <= start < end <= F={width}"
                )
            ranges[name] = (int(columns[0]), int(columns[1]))
        object.__setattr__(self, "feature_names", ranges)

    def _check_values(self) -> None:
        out_of_range = (self.expert_ids < 0) | (self.expert_ids >= self.num_experts)  # [N, L, K]
        if out_of_range.any():
            token, layer, slot = out_of_range.nonzero()[0].tolist()
            raise ConfigError(
                f"expert_ids: {int(self.expert_ids[token, layer, slot])} at token {token}, "
                f"layer {layer}, slot {slot} is outside [0, num_experts={self.num_experts})"
            )
        sorted_ids = self.expert_ids.sort(dim=-1).values  # [N, L, K]
        repeated = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1)  # [N, L]
        if repeated.any():
            token, layer = repeated.nonzero()[0].tolist()
            raise ConfigError(
                f"expert_ids: token {token}, layer {layer} chooses an expert twice: "
                f"{self.expert_ids[token, layer].tolist()}"
            )
        not_finite = ~torch.isfinite(self.expert_weights)  # [N, L, K]
        if not_finite.any():
            token, layer, slot = not_finite.nonzero()[0].tolist()
            raise ConfigError(
                f"expert_weights: {float(self.expert_weights[token, layer, slot])} at token "
                f"{token}, layer {layer}, slot {slot} is not finite"
            )
        for name, lowest in (("seq_ids", 0), ("positions", 0), ("token_ids", UNKNOWN_TOKEN)):
            tensor = getattr(self, name)
            if tensor.numel() and int(tensor.min()) < lowest:
                token = int((tensor < lowest).nonzero()[0])
                raise ConfigError(
                    f"{name}: {int(tensor[token])} at token {token} is below the minimum {lowest}"
                )

    def _check_sequences(self) -> None:
        starts = self._sequence_starts()  # [S]
        run_seq_ids, order = self.seq_ids[starts].sort(stable=True)  # [S]
        split_runs = (run_seq_ids[1:] == run_seq_ids[:-1]).nonzero().flatten()
        if len(split_runs):
            run = int(split_runs[0])
            first_start, second_start = starts[order[run]], starts[order[run + 1]]
            raise ConfigError(
                f"seq_ids: sequence {int(run_seq_ids[run])} is not contiguous: it has tokens "
                f"starting at index {int(first_start)} and again at index {int(second_start)}"
            )
        same_sequence = self.seq_ids[1:] == self.seq_ids[:-1]  # [N - 1]
        not_increasing = same_sequence & (self.positions[1:] <= self.positions[:-1])  # [N - 1]
        if not_increasing.any():
            token = int(not_increasing.nonzero()[0]) + 1
            raise ConfigError(
                f"positions: not strictly increasing within sequence {int(self.seq_ids[token])}: "
                f"token {token - 1} has position {int(self.positions[token - 1])}, token {token} "
                f"has position {int(self.positions[token])}"
            )
