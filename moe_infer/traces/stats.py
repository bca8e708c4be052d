"""Routing statistics of an expert trace, each beside what a uniform random router gives.

This module owns the numbers behind ``moe-infer trace-stats``: per-layer expert popularity and
load imbalance, routing entropy, same-layer reuse between consecutive tokens, cross-layer
conditional probabilities and how well they predict the next layers' experts, co-activation within
a layer; and their JSON, markdown and PNG forms. It does not record traces (``moe_infer.traces.profiler``)
nor train predictors (``moe_infer.predictors``): the cross-layer predictability here is an
in-sample upper reference, not a predictor's held-out recall.

Baseline: a uniform random router picks K distinct experts per token and layer, uniformly and
independently. Every statistic is also computed on such a routing simulated on the trace's own
shape (same tokens, sequences, L, K, E; fixed seed), so small-sample effects (in-sample fitting,
multinomial imbalance) appear in both; the analytic values are given where they are simple
(reuse and predictability K/E, entropy log2 E).

Shape legend: N tokens, L MoE layers, K top-k, E experts, n tokens of one chunk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError, NotSupported

__all__ = ["TraceAnalysis", "analyze", "format_markdown", "trace_statistics", "write_plots", "write_report"]

# One-hot chunks hold about this many float32 values ([n, L, E]), bounding memory on big traces.
_CHUNK_VALUES = 1 << 22
# Co-activation concentration: the share of co-activations carried by this fraction of the
# most frequent expert pairs.
_TOP_PAIR_FRACTION = 0.1
# Affinity heatmaps drawn: at most this many layer pairs at distance 1.
_AFFINITY_PLOTS = 3


@dataclasses.dataclass
class _RoutingCounts:
    """Sufficient statistics of one routing ``expert_ids`` [N, L, K] (float64 counts)."""

    num_experts: int
    top_k: int
    tokens: int
    expert_counts: Tensor  # [L, E]: tokens routed to each expert
    pair_counts: Tensor  # [L, E, E]: tokens routed to both experts (diagonal = expert_counts)
    cross_counts: dict[int, Tensor]  # distance d -> [L - d, E, E]: e at l and e' at l + d
    reuse_sum: Tensor  # [L]: sum over consecutive same-sequence pairs of |S_t & S_t-1| / K
    reuse_pairs: int  # consecutive token pairs within one sequence
    recall_sum: dict[int, Tensor]  # d -> [L - d]: sum over tokens of the top-K prediction recall

    def conditional(self, distance: int) -> Tensor:
        """P(expert e' at layer l + d | expert e at layer l): [L - d, E, E], rows sum to K."""
        sources = self.expert_counts[:-distance, :, None]  # [L - d, E, 1]
        return self.cross_counts[distance] / sources.clamp(min=1)


def _one_hot(expert_ids: Tensor, num_experts: int) -> Tensor:
    """[n, L, K] ids -> [n, L, E] float32 indicator of the chosen experts."""
    one_hot = torch.zeros(*expert_ids.shape[:2], num_experts)
    return one_hot.scatter_(2, expert_ids.long(), 1.0)


def _chunks(num_tokens: int, num_layers: int, num_experts: int):
    step = max(1, _CHUNK_VALUES // (num_layers * num_experts))
    for start in range(0, num_tokens, step):
        yield start, min(start + step, num_tokens)


def _count(expert_ids: Tensor, seq_ids: Tensor, num_experts: int, max_distance: int) -> _RoutingCounts:
    num_tokens, num_layers, top_k = expert_ids.shape
    distances = range(1, min(max_distance, num_layers - 1) + 1)
    counts = _RoutingCounts(
        num_experts=num_experts, top_k=top_k, tokens=num_tokens,
        expert_counts=torch.zeros(num_layers, num_experts, dtype=torch.float64),
        pair_counts=torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64),
        cross_counts={d: torch.zeros(num_layers - d, num_experts, num_experts, dtype=torch.float64)
                      for d in distances},
        reuse_sum=torch.zeros(num_layers, dtype=torch.float64), reuse_pairs=0,
        recall_sum={d: torch.zeros(num_layers - d, dtype=torch.float64) for d in distances},
    )
    previous_one_hot, previous_seq = None, None  # the last token of the previous chunk
    for start, end in _chunks(num_tokens, num_layers, num_experts):
        one_hot = _one_hot(expert_ids[start:end], num_experts)  # [n, L, E]
        seqs = seq_ids[start:end]
        counts.expert_counts += one_hot.sum(0).double()
        counts.pair_counts += torch.einsum("nle,nlf->lef", one_hot, one_hot).double()
        for d in distances:
            counts.cross_counts[d] += torch.einsum("nle,nlf->lef", one_hot[:, :-d], one_hot[:, d:]).double()
        if previous_one_hot is not None:  # consecutive pairs across the chunk boundary
            one_hot_ext = torch.cat([previous_one_hot, one_hot])
            seqs_ext = torch.cat([previous_seq, seqs])
        else:
            one_hot_ext, seqs_ext = one_hot, seqs
        same_sequence = (seqs_ext[1:] == seqs_ext[:-1]).float()  # [n']
        overlap = (one_hot_ext[1:] * one_hot_ext[:-1]).sum(-1) / top_k  # [n', L]
        counts.reuse_sum += (overlap * same_sequence[:, None]).sum(0).double()
        counts.reuse_pairs += int(same_sequence.sum())
        previous_one_hot, previous_seq = one_hot[-1:], seqs[-1:]

    # second pass: predict the top-K experts at l + d from the conditional table of the whole trace
    conditionals = {d: counts.conditional(d).float() for d in distances}
    for start, end in _chunks(num_tokens, num_layers, num_experts):
        one_hot = _one_hot(expert_ids[start:end], num_experts)  # [n, L, E]
        for d, conditional in conditionals.items():
            scores = torch.einsum("nle,lef->nlf", one_hot[:, :-d], conditional)  # [n, L - d, E]
            predicted = scores.topk(top_k, dim=-1).indices  # [n, L - d, K]
            hits = one_hot[:, d:].gather(2, predicted).sum(-1) / top_k  # [n, L - d]
            counts.recall_sum[d] += hits.sum(0).double()
    return counts


def _uniform_routing(num_tokens: int, num_layers: int, top_k: int, num_experts: int,
                     seed: int) -> Tensor:
    """[N, L, K] int32: K distinct experts per token and layer, uniformly at random."""
    generator = torch.Generator().manual_seed(seed)
    expert_ids = torch.empty(num_tokens, num_layers, top_k, dtype=torch.int32)
    for start, end in _chunks(num_tokens, num_layers, num_experts):
        scores = torch.rand(end - start, num_layers, num_experts, generator=generator)
        expert_ids[start:end] = scores.topk(top_k, dim=-1).indices.to(torch.int32)
    return expert_ids


def _entropy_bits(counts: Tensor) -> Tensor:
    """Entropy in bits of the distributions along the last axis (counts, any scale)."""
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1e-300)
    return -(p * torch.log2(p.clamp(min=1e-300))).sum(-1)


def _layer_metrics(counts: _RoutingCounts) -> dict[str, list[float | None]]:
    """Per-layer numbers, each a list over the L axis."""
    expert_counts = counts.expert_counts  # [L, E]
    mean = expert_counts.mean(-1)
    metrics: dict[str, list[float | None]] = {
        "load_imbalance": (expert_counts.max(-1).values / mean.clamp(min=1e-300)).tolist(),
        "entropy_bits": _entropy_bits(expert_counts).tolist(),
        "reuse": ((counts.reuse_sum / counts.reuse_pairs).tolist() if counts.reuse_pairs
                  else [None] * len(mean)),
    }
    if counts.top_k >= 2:
        upper = torch.triu_indices(counts.num_experts, counts.num_experts, offset=1)
        pairs = counts.pair_counts[:, upper[0], upper[1]]  # [L, E (E - 1) / 2]
        top = max(1, round(_TOP_PAIR_FRACTION * pairs.shape[1]))
        share = pairs.topk(top, dim=-1).values.sum(-1) / pairs.sum(-1).clamp(min=1e-300)
        metrics["coactivation_top_pair_share"] = share.tolist()
        metrics["coactivation_entropy_bits"] = _entropy_bits(pairs).tolist()
    return metrics


def _predictability(counts: _RoutingCounts) -> dict[int, list[float]]:
    return {d: (recall / counts.tokens).tolist() for d, recall in counts.recall_sum.items()}


@dataclasses.dataclass
class TraceAnalysis:
    """The statistics of one trace (``statistics``, JSON-ready) and the tables the plots draw."""

    statistics: dict[str, Any]
    popularity: Tensor  # [L, E]: fraction of tokens routed to each expert
    conditionals: dict[int, Tensor]  # d -> [L - d, E, E]: P(e' at l + d | e at l)
    moe_layers: tuple[int, ...]


def analyze(trace: Trace, *, max_distance: int = 3, seed: int = 0) -> TraceAnalysis:
    """Count the trace's routing and a simulated uniform router's on the same shape."""
    if not isinstance(trace, Trace):
        raise TypeError(f"analyze expects a moe_infer.Trace, got {type(trace).__name__}")
    if trace.num_tokens == 0:
        raise ConfigError("the trace holds no tokens; there is nothing to measure")
    if not isinstance(max_distance, int) or max_distance < 1:
        raise ConfigError(f"max_distance must be an int >= 1, got {max_distance!r}")
    num_experts, top_k, num_layers = trace.num_experts, trace.top_k, trace.num_layers
    observed = _count(trace.expert_ids, trace.seq_ids, num_experts, max_distance)
    uniform_ids = _uniform_routing(trace.num_tokens, num_layers, top_k, num_experts, seed)
    uniform = _count(uniform_ids, trace.seq_ids, num_experts, max_distance)

    observed_layers, uniform_layers = _layer_metrics(observed), _layer_metrics(uniform)
    popularity = observed.expert_counts / trace.num_tokens  # [L, E]
    layers = []
    for index, layer_idx in enumerate(trace.moe_layers):
        entry: dict[str, Any] = {"layer": layer_idx, "popularity": popularity[index].tolist()}
        for name in observed_layers:
            entry[name] = observed_layers[name][index]
            entry[f"{name}_uniform"] = uniform_layers[name][index]
        layers.append(entry)

    observed_recall, uniform_recall = _predictability(observed), _predictability(uniform)
    conditionals = {d: observed.conditional(d) for d in observed.cross_counts}
    cross_layer = []
    for d, recalls in observed_recall.items():
        for index, recall in enumerate(recalls):
            cross_layer.append({
                "from_layer": trace.moe_layers[index], "to_layer": trace.moe_layers[index + d],
                "distance": d, "predictability": recall,
                "predictability_uniform": uniform_recall[d][index],
                # the most likely next expert of each expert, averaged: 1.0 = deterministic
                "mean_max_conditional": float(conditionals[d][index].max(-1).values.mean()),
            })

    uniform_rate = top_k / num_experts
    summary: dict[str, Any] = {
        name: {"trace": _mean(observed_layers[name]), "uniform": _mean(uniform_layers[name])}
        for name in observed_layers
    }
    summary["entropy_bits"]["max"] = math.log2(num_experts)
    summary["reuse"]["uniform_analytic"] = uniform_rate
    summary["cross_layer_predictability"] = {
        str(d): {"trace": _mean(observed_recall[d]), "uniform": _mean(uniform_recall[d]),
                 "uniform_analytic": uniform_rate}
        for d in observed_recall
    }
    statistics = {
        "model": trace.model, "family": trace.family, "tokens": trace.num_tokens,
        "sequences": trace.num_sequences, "num_experts": num_experts, "top_k": top_k,
        "moe_layers": list(trace.moe_layers),
        "baseline": (f"uniform random router (K={top_k} distinct of E={num_experts} experts per "
                     f"token and layer) simulated on the trace's tokens and sequences, seed {seed}"),
        "summary": summary, "layers": layers, "cross_layer": cross_layer,
    }
    return TraceAnalysis(statistics, popularity, conditionals, tuple(trace.moe_layers))


def trace_statistics(trace: Trace, *, max_distance: int = 3, seed: int = 0) -> dict[str, Any]:
    """The JSON-ready statistics of ``trace`` (see ``analyze`` and the module docstring).

    Keys: ``summary`` (each metric averaged over layers as ``{"trace", "uniform", ...}``;
    metrics ``load_imbalance``, ``entropy_bits``, ``reuse``, ``cross_layer_predictability``
    keyed by distance, and with K >= 2 ``coactivation_top_pair_share`` and
    ``coactivation_entropy_bits``), ``layers`` (per MoE layer: ``popularity`` and each metric with
    its ``_uniform`` twin), ``cross_layer`` (per layer pair and distance), and the trace's shape.
    """
    return analyze(trace, max_distance=max_distance, seed=seed).statistics


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


# ----------------------------------------------------------------------------- reports


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_markdown(statistics: dict[str, Any]) -> str:
    """A markdown report of ``trace_statistics`` output."""
    s = statistics
    summary = s["summary"]
    lines = [
        f"# Routing statistics: {s['model'] or 'unnamed model'}",
        "",
        f"{s['tokens']} tokens in {s['sequences']} sequences; family {s['family'] or 'unknown'}; "
        f"{len(s['moe_layers'])} MoE layers {s['moe_layers']}; E={s['num_experts']} experts, "
        f"top-K={s['top_k']}.",
        f"Baseline: {s['baseline']}.",
        "",
        "## Summary (mean over layers)",
        "",
        "| metric | trace | uniform router | note |",
        "|---|---|---|---|",
        f"| load imbalance (max/mean) | {_number(summary['load_imbalance']['trace'])} | "
        f"{_number(summary['load_imbalance']['uniform'])} | 1.0 = perfectly balanced |",
        f"| popularity entropy (bits) | {_number(summary['entropy_bits']['trace'])} | "
        f"{_number(summary['entropy_bits']['uniform'])} | max log2(E) = {_number(summary['entropy_bits']['max'])} |",
        f"| same-layer reuse, consecutive tokens | {_number(summary['reuse']['trace'])} | "
        f"{_number(summary['reuse']['uniform'])} | analytic K/E = {_number(summary['reuse']['uniform_analytic'])} |",
    ]
    for d, values in summary["cross_layer_predictability"].items():
        lines.append(
            f"| cross-layer predictability, distance {d} | {_number(values['trace'])} | "
            f"{_number(values['uniform'])} | recall of top-K from P(l+{d} given l), in-sample; "
            f"K/E = {_number(values['uniform_analytic'])} |")
    if "coactivation_top_pair_share" in summary:
        lines.append(
            f"| co-activation: share of top {_TOP_PAIR_FRACTION:.0%} expert pairs | "
            f"{_number(summary['coactivation_top_pair_share']['trace'])} | "
            f"{_number(summary['coactivation_top_pair_share']['uniform'])} | higher = experts fire in fixed pairs |")
    lines += ["", "## Per layer", "",
              "| layer | imbalance | uniform | entropy (bits) | uniform | reuse | uniform | hottest expert (share) |",
              "|---|---|---|---|---|---|---|---|"]
    for layer in s["layers"]:
        popularity = layer["popularity"]
        hottest = max(range(len(popularity)), key=popularity.__getitem__)
        lines.append(
            f"| {layer['layer']} | {_number(layer['load_imbalance'], 2)} | "
            f"{_number(layer['load_imbalance_uniform'], 2)} | {_number(layer['entropy_bits'], 2)} | "
            f"{_number(layer['entropy_bits_uniform'], 2)} | {_number(layer['reuse'])} | "
            f"{_number(layer['reuse_uniform'])} | {hottest} ({popularity[hottest] / s['top_k']:.1%}) |")
    if s["cross_layer"]:
        lines += ["", "## Cross-layer predictability", "",
                  "| from layer | to layer | distance | recall | uniform | mean max P(e' given e) |",
                  "|---|---|---|---|---|---|"]
        for pair in s["cross_layer"]:
            lines.append(
                f"| {pair['from_layer']} | {pair['to_layer']} | {pair['distance']} | "
                f"{_number(pair['predictability'])} | {_number(pair['predictability_uniform'])} | "
                f"{_number(pair['mean_max_conditional'])} |")
    return "\n".join(lines) + "\n"


def write_plots(analysis: TraceAnalysis, directory: str | os.PathLike) -> list[Path]:
    """PNG heatmaps: expert popularity [L, E] and P(e' at l+1 | e at l) for a few layer pairs.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.
    """
    try:  # an optional dependency: only these plots draw anything
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise NotSupported("writing plots needs matplotlib: pip install 'moe-infer[plots]'") from err

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = analysis.moe_layers
    written = []

    def save(figure: Figure, name: str) -> None:
        FigureCanvasAgg(figure)
        path = directory / name
        figure.savefig(path, dpi=100)
        written.append(path)

    popularity = analysis.popularity.numpy()  # [L, E]
    figure = Figure(figsize=(max(6.0, popularity.shape[1] * 0.12 + 2), max(3.0, len(layers) * 0.25 + 1.5)),
                    layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(popularity, aspect="auto", interpolation="nearest", cmap="viridis")
    axes.set_xlabel("expert")
    axes.set_ylabel("decoder layer")
    step = max(1, len(layers) // 16)
    axes.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    axes.set_title("expert popularity (fraction of tokens)")
    figure.colorbar(image, ax=axes)
    save(figure, "popularity.png")

    conditional = analysis.conditionals.get(1)
    if conditional is not None:
        count = len(conditional)
        chosen = sorted({round(i * (count - 1) / max(1, _AFFINITY_PLOTS - 1)) for i in range(_AFFINITY_PLOTS)})
        for index in chosen[:count]:
            source, target = layers[index], layers[index + 1]
            figure = Figure(figsize=(5.5, 4.5), layout="constrained")
            axes = figure.add_subplot()
            image = axes.imshow(conditional[index].numpy(), interpolation="nearest", cmap="magma",
                                vmin=0.0)
            axes.set_xlabel(f"expert at layer {target}")
            axes.set_ylabel(f"expert at layer {source}")
            axes.set_title(f"P(expert at {target} | expert at {source})")
            figure.colorbar(image, ax=axes)
            save(figure, f"affinity_l{source}_l{target}.png")
    return written


def write_report(trace: Trace, *, plots: str | os.PathLike | None = None,
                 json_path: str | os.PathLike | None = None,
                 markdown_path: str | os.PathLike | None = None, max_distance: int = 3,
                 seed: int = 0) -> tuple[dict[str, Any], list[Path]]:
    """Analyze ``trace`` and write what was asked for; returns (statistics, files written)."""
    analysis = analyze(trace, max_distance=max_distance, seed=seed)
    written = []
    if plots is not None:
        written += write_plots(analysis, plots)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(analysis.statistics, indent=1) + "\n")
        written.append(Path(json_path))
    if markdown_path is not None:
        Path(markdown_path).write_text(format_markdown(analysis.statistics))
        written.append(Path(markdown_path))
    return analysis.statistics, written
