"""The `Predictor` base class: what every routing predictor shares.

This module owns the predictor contract, the model signature a predictor is bound to (a trace of
another model is refused), evaluation (recall of the true experts among the predicted top-K per
layer distance, per layer, calibration, cost) and the file format (safetensors tensors + JSON
metadata; nothing is ever unpickled). It does not define any predictor (``baselines``,
``expertflow``, ``pregate``), nor train one (``moe_infer.predictors.train``), nor attach one to a
running model (``moe_infer.predictors.runtime``).

What "known at distance d" means: tokens are processed in sequence order (decode), MoE layer by
MoE layer. To predict the experts of token n at MoE-layer position l with distance d, a predictor
may use the routing and hidden states of token n at positions <= l - d (the residual stream too),
the ids of tokens <= n of its sequence, the full routing and MoE inputs of the earlier tokens of its
sequence, and the model's weights other than the routed experts (so it may run the
attention of layer l - d + 1 over the earlier tokens' cached keys and values, as
``lookahead.AttentionLookahead`` does). For l < d only what is known before the first MoE layer may
be used (token ids, earlier tokens' routing and MoE inputs).

Scores are estimates of the probability that the token uses the expert at that layer (in [0, 1],
summing to about K over the E experts); higher = more likely.

Shape legend: N tokens, L MoE layers, K top-k, E experts, H hidden size, D distances.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from moe_infer.files import save_safetensors
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError, FileFormatError, MissingFile, NotSupported

FORMAT = "moe_infer.predictor/1"


class PredictorMismatch(ConfigError):
    """A predictor was given a trace (or model) of another model than the one it was trained for."""


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What a predictor is bound to: the routing shape of one model."""

    model: str
    family: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]

    @classmethod
    def of(cls, trace: Trace) -> ModelSignature:
        return cls(trace.model, trace.family, trace.num_experts, trace.top_k, tuple(trace.moe_layers))

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "moe_layers": list(self.moe_layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSignature:
        return cls(str(data["model"]), str(data["family"]), int(data["num_experts"]), int(data["top_k"]),
                   tuple(int(layer) for layer in data["moe_layers"]))

    def check(self, other: ModelSignature, what: str) -> None:
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                raise PredictorMismatch(
                    f"{what} has {field.name}={_show(theirs)}, but this predictor was trained for "
                    f"{field.name}={_show(mine)} (model {self.model!r}, {self.family}, "
                    f"{self.num_experts} experts top-{self.top_k}, MoE layers {list(self.moe_layers)}); "
                    "train a predictor on a trace of that model")


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


class Predictor(ABC):
    """A routing predictor bound to one model (``signature``).

    Subclasses set ``kind``, implement ``_predict`` (offline, on a trace), ``tensors`` /
    ``_from_tensors`` (their learned state) and ``runtime_scores`` (online, from what a running
    model reports at one MoE layer, see ``moe_infer.predictors.runtime``).
    """

    kind: ClassVar[str] = "base"
    # whether runtime_scores reads CallState.lookahead_features (moe_infer.predictors.lookahead)
    reads_attention_lookahead: ClassVar[bool] = False
    # kind -> class, filled as each kind's class is defined (`moe_infer.predictors` imports them all):
    # `load` finds a file's class here, without importing the registry that imports this module
    KINDS: ClassVar[dict[str, type[Predictor]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):
            Predictor.KINDS[cls.kind] = cls

    def __init__(self, signature: ModelSignature, options: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None):
        self.signature = signature
        self.options = dict(options or {})
        self.training = dict(training or {})  # how it was trained: tokens, seconds, loss ...

    # ----------------------------------------------------------------- properties
    @property
    def num_layers(self) -> int:
        return len(self.signature.moe_layers)

    @property
    def num_experts(self) -> int:
        return self.signature.num_experts

    @property
    def top_k(self) -> int:
        return self.signature.top_k

    # ----------------------------------------------------------------- offline prediction
    def check_trace(self, trace: Trace) -> None:
        """``PredictorMismatch`` (a ``ValueError``) when ``trace`` comes from another model."""
        if not isinstance(trace, Trace):
            raise TypeError(f"expected a moe_infer.Trace, got {type(trace).__name__}")
        self.signature.check(ModelSignature.of(trace), "the trace")

    def predict_trace(self, trace: Trace, distance: int) -> np.ndarray:
        """Scores [N, L, E] float32 of the experts each token uses at each MoE layer, each computed
        from what is known ``distance`` MoE layers earlier (module docstring)."""
        self.check_trace(trace)
        if isinstance(distance, bool) or not isinstance(distance, int) or distance < 1:
            raise ConfigError(f"distance={distance!r}: expected an int >= 1 (MoE layers ahead)")
        scores = self._predict(trace, distance)
        assert scores.shape == (trace.num_tokens, self.num_layers, self.num_experts), scores.shape
        return np.ascontiguousarray(scores, dtype=np.float32)

    @abstractmethod
    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        ...

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, trace: Trace, *, top_k: int | None = None, max_distance: int = 4) -> dict[str, Any]:
        """Recall of the true experts among the predicted top-``top_k`` (default: the model's K).

        Returns ``{"recall": {d: value}, "recall_per_layer": {d: [L values]}, "calibration": {d:
        {"brier", "ece"}}, "cost": {...}, "seconds_per_token": ..., "tokens": N, "top_k": k}``.
        """
        from moe_infer.predictors.evaluation import calibration, recall

        self.check_trace(trace)
        top_k = self.top_k if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.num_experts:
            raise ConfigError(f"top_k={top_k!r}: expected an int in [1, num_experts={self.num_experts}]")
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
            raise ConfigError(f"max_distance={max_distance!r}: expected an int >= 1")
        result: dict[str, Any] = {"kind": self.kind, "tokens": trace.num_tokens, "top_k": top_k,
                                  "recall": {}, "recall_per_layer": {}, "calibration": {}}
        seconds = 0.0
        for distance in range(1, max_distance + 1):
            start = time.perf_counter()
            scores = self.predict_trace(trace, distance)
            seconds += time.perf_counter() - start
            per_layer = recall(scores, trace.expert_ids.numpy(), top_k)
            result["recall"][distance] = float(per_layer.mean())
            result["recall_per_layer"][distance] = [float(value) for value in per_layer]
            result["calibration"][distance] = calibration(scores, trace.expert_ids.numpy())
        result["seconds_per_token"] = seconds / max_distance / max(trace.num_tokens, 1)
        result["cost"] = self.cost()
        return result

    def cost(self) -> dict[str, Any]:
        """Multiply-accumulates per token to predict every MoE layer (all sources and depths)."""
        return {"macs_per_token": int(self.macs_per_token()), "parameters": int(self.num_parameters())}

    def macs_per_token(self) -> int:
        return 0

    def num_parameters(self) -> int:
        return sum(int(tensor.numel()) for tensor in self.tensors().values())

    # ----------------------------------------------------------------- runtime
    def runtime_scores(self, position: int, state: Any, max_depth: int) -> dict[int, torch.Tensor]:
        """Online prediction at MoE-layer ``position``: ``{target position: scores [T, E]}`` for
        targets ``position + 1 .. position + max_depth`` (``state`` is a
        ``moe_infer.predictors.runtime.CallState``: what the running model revealed so far)."""
        raise NotSupported(f"the {self.kind} predictor has no runtime prediction")

    # ----------------------------------------------------------------- files
    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned state, saved as safetensors tensors."""

    @classmethod
    @abstractmethod
    def _from_tensors(cls, signature: ModelSignature, options: dict[str, Any], training: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> Predictor:
        ...

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "kind": self.kind, "signature": json.dumps(self.signature.to_json()),
                "options": json.dumps(self.options), "training": json.dumps(self.training)}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (.safetensors) atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        if not path.parent.is_dir():
            raise MissingFile(f"output folder {os.fspath(path.parent)!r} does not exist")
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors().items()}
        if not tensors:  # safetensors needs at least a header; keep one marker tensor
            tensors = {"_empty": torch.zeros(0)}
        save_safetensors(tensors, path, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictor:
        """Read a predictor file written by ``save``; the class comes from its ``kind``."""
        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"predictor file {os.fspath(path)!r} does not exist")
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys() if name != "_empty"}
        except SafetensorError as error:
            raise FileFormatError(f"{path}: truncated or not a safetensors predictor file ({error})") from None
        if metadata.get("format") != FORMAT:
            raise FileFormatError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}; "
                             "not a moe_infer predictor")
        try:
            kind = metadata["kind"]
            signature = ModelSignature.from_json(json.loads(metadata["signature"]))
            options, training = json.loads(metadata["options"]), json.loads(metadata["training"])
        except (KeyError, ValueError, TypeError) as error:
            raise FileFormatError(f"{path}: malformed predictor metadata ({error!r})") from None
        klass = Predictor.KINDS.get(kind)
        if klass is None:
            raise FileFormatError(f"{path}: unknown predictor kind {kind!r}; kinds are {', '.join(Predictor.KINDS)}")
        if cls is not Predictor and not issubclass(klass, cls):
            raise FileFormatError(f"{path}: holds a {kind!r} predictor, not a {cls.kind!r} one")
        try:
            return klass._from_tensors(signature, options, training, tensors)
        except KeyError as error:
            raise FileFormatError(f"{path}: the {kind} predictor lacks tensor {error}") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            # torch's load_state_dict size mismatches, shape checks, options refused: all name no file
            detail = " ".join(str(error).split())
            raise FileFormatError(f"{path}: the {kind} predictor's tensors and options do not fit together "
                                  f"({detail[:400]})") from None

    def __repr__(self) -> str:
        s = self.signature
        return (f"{type(self).__name__}(model={s.model!r}, experts={s.num_experts}, top_k={s.top_k}, "
                f"moe_layers={list(s.moe_layers)})")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`tensor` if it has `shape`; ValueError otherwise (`Predictor.load` names the file)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor


def source_position(layer_position: int, distance: int) -> int:
    """The MoE-layer position whose state is known ``distance`` layers before ``layer_position``;
    -1 means "before the first MoE layer"."""
    return max(layer_position - distance, -1)
