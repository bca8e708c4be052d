"""The profiler: run a model over text or prompts and record an expert trace.

This module owns turning text into sequences (windows of a corpus, prompts of a JSONL file; the
files are read by `inputs.py`), running a wrapped model over them in batches (prefill with teacher forcing, or a greedy decode
loop with a KV cache), capturing every MoE layer's routing through ``MoELayer.routing_observers``
and writing a ``moe_infer.trace/1`` file with bounded memory. It does not define the trace format
(``moe_infer.traces.trace``) nor compute statistics on traces (``moe_infer.traces.stats``).

Streaming (`moe_infer.traces.parts`): records are accumulated for at most ``chunk_tokens`` tokens,
each chunk is saved as a part trace in a temporary folder next to the output, and the parts are
joined into one ``.safetensors`` file tensor by tensor, part by part, so neither the records nor
the final file are ever held in memory whole. The final file is written under a temporary name
and renamed.

Shape legend: B sequences in a batch, S tokens per sequence (padded), T = B * S tokens of one
forward call, N recorded tokens, L MoE layers, K top-k, E experts, H hidden size, F feature columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_infer.models import DTYPES, decode_tokens, encode_text, load_model  # noqa: F401 (re-exported)
from moe_infer.models import cache_argument, output_cache
from moe_infer.traces.inputs import check_inputs_exist, read_prompts, text_windows
from moe_infer.traces.parts import PartWriter, check_written, merge_trace_parts  # noqa: F401 (merge_trace_parts: re-exported)
from moe_infer.errors import ConfigError, MissingFile

__all__ = [
    "MODES",
    "ProfileOptions",
    "ProfileResult",
    "decode_tokens",
    "encode_text",
    "load_model",
    "merge_trace_parts",
    "read_prompts",
    "record_trace",
    "text_windows",
]

MODES = ("prefill", "generate")
EMBEDDING_FEATURE = "embedding"
MOE_INPUT_FEATURE = "moe_input"  # "moe_input:<decoder-layer index>"


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How to run the model and what to record; checked in ``__post_init__``.

    - ``mode``: "prefill" (teacher forcing over each sequence) or "generate" (each sequence is a
      prompt, continued greedily for ``new_tokens`` tokens; prompt and generated tokens recorded).
    - ``seq_len``: text is cut into windows of this many tokens; in generate mode a longer prompt
      keeps its last ``seq_len`` tokens.
    - ``batch_size``: sequences per forward call.
    - ``max_tokens``: stop once this many tokens are recorded (None: the whole input).
    - ``features``: "embedding" (``get_input_embeddings()`` of the token) and/or
      "moe_input:<layer>" (the hidden state entering the MoE block of that decoder layer), stored
      as float16 columns in this order, named in the trace's ``feature_names``.
    - ``router_logits``: also store each MoE layer's router logits (float16).
    - ``chunk_tokens``: at most this many tokens of records are kept in memory before they are
      written to a part file.
    - ``progress``: show a tqdm progress bar (on stderr).
    """

    mode: str = "prefill"
    seq_len: int = 256
    batch_size: int = 8
    new_tokens: int = 32
    max_tokens: int | None = None
    features: tuple[str, ...] = ()
    router_logits: bool = False
    chunk_tokens: int = 65536
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: expected one of {list(MODES)}")
        for name in ("seq_len", "batch_size", "new_tokens", "chunk_tokens"):
            _check_positive(name, getattr(self, name))
        if self.max_tokens is not None:
            _check_positive("max_tokens", self.max_tokens)
        features = (self.features,) if isinstance(self.features, str) else tuple(self.features)
        for feature in features:
            parse_feature(feature)
        if len(set(features)) != len(features):
            raise ConfigError(f"features={list(features)} names a feature twice")
        object.__setattr__(self, "features", features)

    def replace(self, **fields: Any) -> ProfileOptions:
        return dataclasses.replace(self, **fields)


def parse_feature(feature: str) -> int | None:
    """The decoder-layer index of a "moe_input:<layer>" feature, None for "embedding"."""
    if feature == EMBEDDING_FEATURE:
        return None
    kind, _, layer = feature.partition(":")
    if kind == MOE_INPUT_FEATURE and layer.isdigit():
        return int(layer)
    raise ConfigError(
        f"feature {feature!r}: expected {EMBEDDING_FEATURE!r} or '{MOE_INPUT_FEATURE}:<layer>' "
        "with a decoder-layer index of an MoE layer"
    )


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    path: Path
    tokens: int
    sequences: int
    parts: int  # part files the trace was assembled from
    seconds: float


# ----------------------------------------------------------------------------- sequences


def _sequences(texts: Sequence[str | os.PathLike], prompts, tokenizer,
               options: ProfileOptions) -> Iterator[list[int]]:
    """Token ids of every sequence: text windows first, then prompts (each split into windows in
    prefill mode, cut to its last ``seq_len`` tokens in generate mode)."""
    for path in texts:
        yield from text_windows(path, tokenizer, options.seq_len)
    if prompts is None:
        return
    prompt_texts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else prompts
    for prompt in prompt_texts:
        ids = encode_text(tokenizer, prompt)
        if not ids:
            continue
        if options.mode == "generate":
            yield ids[-options.seq_len:]
        else:
            for start in range(0, len(ids), options.seq_len):
                yield ids[start:start + options.seq_len]


def _batches(sequences: Iterator[list[int]], batch_size: int,
             max_tokens: int | None) -> Iterator[list[list[int]]]:
    """Groups of ``batch_size`` sequences; with ``max_tokens``, the input stops once that many
    tokens are taken (the last sequence cut), so no forward call runs past the budget."""
    batch: list[list[int]] = []
    remaining = math.inf if max_tokens is None else max_tokens
    for ids in sequences:
        if remaining <= 0:
            break
        ids = ids[:int(min(len(ids), remaining))]
        remaining -= len(ids)
        batch.append(ids)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- recording


class _RoutingRecorder:
    """The routing observer of every MoE layer. Before each forward call ``start(keep)`` names the
    tokens to record; each layer's routing (and hidden state, for feature layers) of those tokens
    is copied out as the layer reports it, before the executor moves on."""

    def __init__(self, layers, feature_layers: Sequence[int], router_logits: bool):
        self.index = {layer.layer_idx: i for i, layer in enumerate(layers)}
        self.feature_layers = set(feature_layers)
        self.want_logits = router_logits
        self.start(None)

    def start(self, keep: Tensor | None) -> None:
        self.keep = keep  # [T] bool over the call's flattened tokens
        self.routings: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}  # L-axis index -> kept rows
        self.hidden: dict[int, Tensor] = {}  # decoder-layer index -> [n, H]

    def __call__(self, layer, hidden: Tensor, routing) -> None:
        keep = self.keep
        if keep is None or routing.expert_ids.shape[0] != keep.numel():
            raise RuntimeError(f"MoE layer {layer.layer_idx} routed {routing.expert_ids.shape[0]} tokens; "
                               f"the profiler expected {None if keep is None else keep.numel()}")
        logits = None
        if self.want_logits:
            if routing.router_logits is None:
                raise ConfigError(f"router logits requested, but the {layer.adapter.name} router adapter of "
                                 f"layer {layer.layer_idx} gives none")
            logits = routing.router_logits[keep].float()  # [n, E]
        self.routings[self.index[layer.layer_idx]] = (
            routing.expert_ids[keep], routing.expert_weights[keep].float(), logits)  # [n, K] x 2
        if layer.layer_idx in self.feature_layers:
            self.hidden[layer.layer_idx] = hidden[keep].float()  # [n, H]

    def take(self) -> dict[str, Tensor]:
        """Routing records of the kept tokens of the last forward call, on the CPU."""
        missing = [i for i in range(len(self.index)) if i not in self.routings]
        if missing:
            raise RuntimeError(f"MoE layers at positions {missing} were not called in this forward")
        routings = [self.routings[i] for i in range(len(self.index))]
        records = {
            "expert_ids": torch.stack([ids for ids, _, _ in routings], 1).cpu(),  # [n, L, K]
            "expert_weights": torch.stack([weights for _, weights, _ in routings], 1).cpu(),  # [n, L, K]
        }
        if self.want_logits:
            records["router_logits"] = torch.stack([logits for _, _, logits in routings], 1).cpu()  # [n, L, E]
        return records


def _features(options: ProfileOptions, recorder: _RoutingRecorder, embed: nn.Module,
              input_ids: Tensor, keep: Tensor) -> Tensor | None:
    """[n, F] feature columns of the kept tokens, in ``options.features`` order."""
    columns = []
    for feature in options.features:
        layer_idx = parse_feature(feature)
        if layer_idx is None:
            columns.append(embed(input_ids.reshape(-1)[keep]).float())
        else:
            columns.append(recorder.hidden[layer_idx])
    return torch.cat(columns, 1).cpu() if columns else None


def _feature_names(options: ProfileOptions, model: nn.Module, executor) -> dict[str, list[int]] | None:
    ranges, start = {}, 0
    hidden_size = model.get_input_embeddings().weight.shape[1]
    for feature in options.features:
        layer_idx = parse_feature(feature)
        if layer_idx is None:
            width = hidden_size
        else:
            if layer_idx not in executor.moe_layer_indices:
                raise ConfigError(f"feature {feature!r}: layer {layer_idx} is not an MoE layer; "
                                 f"MoE layers are {executor.moe_layer_indices}")
            width = executor.layer(layer_idx).expert_source.hidden_size
        ranges[feature] = [start, start + width]
        start += width
    return ranges or None


@dataclasses.dataclass
class _Batch:
    """Records of one batch, accumulated over its forward calls; ``row`` [n] is the sequence's
    row in the batch, so the tokens can be put in sequence order at the end."""

    parts: list[dict[str, Tensor]] = dataclasses.field(default_factory=list)

    def add(self, records: dict[str, Tensor | None]) -> None:
        self.parts.append({name: tensor for name, tensor in records.items() if tensor is not None})

    def in_sequence_order(self, first_seq_id: int, max_tokens: int | None) -> dict[str, Tensor]:
        records = {name: torch.cat([part[name] for part in self.parts]) for name in self.parts[0]}
        row, positions = records.pop("row"), records["positions"]
        order = torch.argsort(row * (int(positions.max()) + 1) + positions, stable=True)
        records = {name: tensor[order] for name, tensor in records.items()}
        records["seq_ids"] = row[order] + first_seq_id
        if max_tokens is not None:
            records = {name: tensor[:max_tokens] for name, tensor in records.items()}
        return records


def _prefill_batch(model, recorder, options, batch: list[list[int]], pad_id: int,
                   device) -> _Batch:
    """Teacher forcing over right-padded sequences; pad tokens are not recorded."""
    lengths = torch.tensor([len(ids) for ids in batch])
    width = int(lengths.max())
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, S]
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
    columns = torch.arange(width)
    mask = (columns[None, :] < lengths[:, None]).long()  # [B, S]
    keep = mask.reshape(-1).bool()  # [T]
    input_ids, mask_d, keep_d = input_ids.to(device), mask.to(device), keep.to(device)
    recorder.start(keep_d)
    model(input_ids=input_ids, attention_mask=mask_d, use_cache=False, logits_to_keep=1)
    records = recorder.take()
    records["features"] = _features(options, recorder, model.get_input_embeddings(), input_ids, keep_d)
    records["token_ids"] = input_ids.reshape(-1)[keep_d].cpu()
    records["positions"] = columns.expand(len(batch), width).reshape(-1)[keep]
    records["row"] = torch.arange(len(batch))[:, None].expand(len(batch), width).reshape(-1)[keep]
    batch_records = _Batch()
    batch_records.add(records)
    return batch_records


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def _generate_batch(model, recorder, options, batch: list[list[int]], pad_id: int,
                    device) -> _Batch:
    """Greedy decoding of left-padded prompts with a KV cache; every token fed to the model (the
    prompt, then each generated token) is recorded. A sequence stops after it feeds an EOS."""
    lengths = torch.tensor([len(ids) for ids in batch])
    width = int(lengths.max())
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, S]
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
    mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()  # [B, S]
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # [B, S]; pads get a harmless 1
    rows = torch.arange(len(batch), device=device)
    alive = torch.ones(len(batch), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(_eos_ids(model)), dtype=torch.long, device=device)
    cache = None  # the model's first call builds the cache type it needs (hybrid models differ)
    embed = model.get_input_embeddings()
    batch_records = _Batch()
    keep = mask.bool()  # [B, S] tokens of this call to record
    for step in range(options.new_tokens + 1):
        flat_keep = keep.reshape(-1)
        recorder.start(flat_keep)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        records = recorder.take()
        records["features"] = _features(options, recorder, embed, input_ids, flat_keep)
        records["token_ids"] = input_ids[keep].cpu()
        records["positions"] = positions[keep].cpu()
        records["row"] = rows[:, None].expand_as(keep)[keep].cpu()
        batch_records.add(records)
        if step == options.new_tokens:
            break
        if step > 0 and len(eos):  # a generated EOS was just fed: that sequence is complete
            alive = alive & ~torch.isin(input_ids[:, -1], eos)
            if not alive.any():
                break
        next_ids = out.logits[:, -1].argmax(-1)  # [B]
        input_ids = torch.where(alive, next_ids, pad_id)[:, None]  # [B, 1]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, alive.long()[:, None]], 1)
        keep = alive[:, None]
    return batch_records


# ----------------------------------------------------------------------------- entry point


def record_trace(model: nn.Module, out: str | os.PathLike, *, texts: Sequence[str | os.PathLike] = (),
                 prompts: str | os.PathLike | Iterable[str] | None = None, tokenizer=None,
                 model_name: str | None = None, options: ProfileOptions | None = None,
                 **fields: Any) -> ProfileResult:
    """Run ``model`` over ``texts`` (files cut into windows) and ``prompts`` (a JSONL file or
    strings) and write the routing of every recorded token to the trace file ``out``.

    ``options`` and/or ``ProfileOptions`` fields as keywords. A model that is not wrapped is
    wrapped for the run and unwrapped after it; eval mode is set for the run and the previous
    mode restored. ``tokenizer=None`` reads text as UTF-8 byte ids.
    """
    import moe_infer

    options = ProfileOptions() if options is None else options
    if not isinstance(options, ProfileOptions):
        raise TypeError(f"options must be a ProfileOptions, got {type(options).__name__}")
    if fields:
        options = options.replace(**fields)
    texts = [os.fspath(path) for path in texts]
    if not texts and prompts is None:
        raise ConfigError("nothing to profile: give text files and/or prompts")
    check_inputs_exist(texts, prompts if isinstance(prompts, (str, os.PathLike)) else None)
    out = Path(out)
    if not out.parent.is_dir():
        raise MissingFile(f"output folder {os.fspath(out.parent)!r} does not exist")

    we_wrapped = not moe_infer.is_wrapped(model)
    if we_wrapped:
        moe_infer.wrap(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    parts_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
    try:
        executor = moe_infer.executor(model)
        trace_fields = _trace_fields(model, executor, texts, prompts, options, model_name)
        feature_layers = [layer for layer in map(parse_feature, options.features) if layer is not None]
        recorder = _RoutingRecorder(executor.layers, feature_layers, options.router_logits)
        writer = PartWriter(parts_dir, options.chunk_tokens, trace_fields)
        tokens, sequences = _run(model, executor, recorder, writer, texts, prompts, tokenizer, options)
        if tokens == 0:
            raise ConfigError("the inputs hold no text: no token was recorded")
        parts = writer.finish()
        merge_trace_parts(parts, out)
        check_written(out, tokens)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        model.train(was_training)
        if we_wrapped:
            moe_infer.unwrap(model)
    return ProfileResult(out, tokens, sequences, len(parts), time.perf_counter() - start)


@torch.inference_mode()
def _run(model, executor, recorder, writer, texts, prompts, tokenizer, options) -> tuple[int, int]:
    from tqdm.auto import tqdm

    run_batch = _prefill_batch if options.mode == "prefill" else _generate_batch
    device = model.get_input_embeddings().weight.device
    pad_id = _pad_id(model, tokenizer)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    tokens = sequences = 0
    for layer in executor.layers:
        layer.routing_observers.append(recorder)
    total = _expected_tokens(texts, prompts, tokenizer, options) if options.progress else None
    progress = tqdm(total=total, unit="tok", desc="profile", disable=not options.progress)
    try:
        for batch in _batches(_sequences(texts, prompts, tokenizer, options), options.batch_size,
                              options.max_tokens):
            too_large = max(max(ids) for ids in batch)
            if too_large >= vocab_size:
                raise ConfigError(f"token id {too_large} is outside the model's vocabulary of {vocab_size} "
                                 "(without a tokenizer, text is read as UTF-8 bytes: the vocabulary "
                                 "must hold 256 ids)")
            remaining = None if options.max_tokens is None else options.max_tokens - tokens
            records = run_batch(model, recorder, options, batch, pad_id, device).in_sequence_order(
                sequences, remaining)
            writer.add(records)
            recorded = len(records["seq_ids"])
            tokens += recorded
            sequences += int(records["seq_ids"].unique().numel())
            progress.update(recorded)
            if options.max_tokens is not None and tokens >= options.max_tokens:
                break
    finally:
        progress.close()
        for layer in executor.layers:
            layer.routing_observers.remove(recorder)
    return tokens, sequences


def _expected_tokens(texts, prompts, tokenizer, options: ProfileOptions) -> int | None:
    """The tokens a run will record (the progress bar's total): the inputs are tokenized once more
    to count them. In generate mode an upper bound: a sequence that emits EOS stops early. None when
    the prompts are an iterator that counting would consume."""
    if prompts is not None and not isinstance(prompts, (str, os.PathLike, list, tuple)):
        return options.max_tokens
    per_sequence = options.new_tokens if options.mode == "generate" else 0
    total = sum(len(ids) + per_sequence for ids in _sequences(texts, prompts, tokenizer, options))
    return total if options.max_tokens is None else min(total, options.max_tokens)


def _pad_id(model, tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(getattr(model, "config", None), "pad_token_id", None)):
        if isinstance(candidate, int) and candidate >= 0:
            return candidate
    return 0  # any id works: padded positions are masked and never recorded


def _trace_fields(model, executor, texts, prompts, options, model_name) -> dict[str, Any]:
    layers = executor.layers
    top_ks = {layer.adapter.top_k for layer in layers}
    num_experts = {layer.num_experts for layer in layers}
    if len(top_ks) != 1 or len(num_experts) != 1:
        raise ConfigError(f"a trace needs the same experts and top-k in every MoE layer, got "
                         f"num_experts {sorted(num_experts)} and top_k {sorted(top_ks)}")
    source: dict[str, Any] = {"mode": options.mode, "seq_len": options.seq_len}
    if options.mode == "generate":
        source["new_tokens"] = options.new_tokens
    if texts:
        source["files"] = texts
    if prompts is not None:
        source["prompts"] = os.fspath(prompts) if isinstance(prompts, (str, os.PathLike)) else "<list>"
    if options.max_tokens is not None:
        source["max_tokens"] = options.max_tokens
    if model_name is None:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {
        "num_experts": num_experts.pop(),
        "moe_layers": executor.moe_layer_indices,
        "model": model_name,
        "family": layers[0].family,
        "source": json.dumps(source),
        "feature_names": _feature_names(options, model, executor),
    }
