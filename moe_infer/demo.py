"""`moe-infer demo`: wrap a small MoE model, prove the outputs are unchanged, generate, report.

The default model is the shipped `tiny-mixtral` (trained, so its routing has real structure);
`--model random-mixtral` builds an untrained Mixtral-shaped model from a config instead, and any
`transformers` directory works too. Runs on the CPU, and on the GPU when one is present.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moe_infer
import moe_infer.assets
from moe_infer import hub
from moe_infer.families import find_moe_blocks
from moe_infer.models import decode_tokens, encode_text, load_model


@dataclass
class DemoResult:
    model_name: str
    device: str
    max_logit_diff: float
    generated_text: str
    new_tokens: int
    tokens_per_s_wrapped: float
    tokens_per_s_unwrapped: float
    stats: dict
    budget_runs: list = field(default_factory=list)  # BudgetRun, ours and the plain LRU baseline
    budget_bytes: int = 0
    expert_bytes_total: int = 0


@dataclass
class BudgetRun:
    """One generation with the experts under a byte budget."""

    label: str
    fields: dict
    tokens_per_s: float
    hit_rate: float
    bytes_moved: int
    stall_seconds: float
    cpu_computed_experts: int
    same_tokens: bool  # generated exactly what the unlimited run generated
    predictor_seconds: float = 0.0  # wall time in the prediction hook during the timed generation
    seconds: float = 0.0  # of the timed generation


# ours: expertflow (room apportioned between layers by predicted need; equal shares without a
# predictor, which beats one LRU pool over all layers on held-out text: see
# bench/results/tiny-mixtral-heldout-simulate.md), CPU compute of misses by the cost model, and for a
# shipped model its shipped expertflow predictor prefetching one MoE layer ahead; the baseline:
# plain on-demand LRU, the mixtral-offloading design
OURS = {"cache_policy": "expertflow", "cpu_compute": "auto"}
BASELINE = {"cache_policy": "lru", "cpu_compute": "never", "predictor": None}
BUDGET_FRACTION = 0.5  # of all expert bytes: half the experts of every layer


def _timed_generate(model, input_ids, new_tokens: int, pad_token_id: int) -> tuple[torch.Tensor, float]:
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@torch.inference_mode()
def run_demo(model_name: str = "tiny-mixtral", prompt: str = "def main(", new_tokens: int = 64,
             device: str | None = None, dtype: str = "float32") -> DemoResult:
    source = hub.resolve(model_name) if hub.is_hub_id(model_name) else model_name
    _check_moe(source)
    model, tokenizer = load_model(source, device=device, dtype=dtype)
    device_t = model.device
    input_ids = torch.tensor([encode_text(tokenizer, prompt)], device=device_t)
    pad = getattr(tokenizer, "pad_token_id", None) or 0

    reference_logits = model(input_ids).logits
    _timed_generate(model, input_ids, 4, pad)  # warm-up, so neither timing pays for first calls
    _, seconds_unwrapped = _timed_generate(model, input_ids, new_tokens, pad)

    moe_infer.wrap(model)
    max_diff = (model(input_ids).logits - reference_logits).abs().max().item()
    moe_infer.executor(model).reset_stats()
    out, seconds_wrapped = _timed_generate(model, input_ids, new_tokens, pad)
    stats = moe_infer.executor(model).stats()
    text = decode_tokens(tokenizer, out[0].tolist())
    result = DemoResult(model_name, str(device_t), max_diff, text, new_tokens,
                        new_tokens / seconds_wrapped, new_tokens / seconds_unwrapped, stats)
    shipped = predictor_beside(source)
    ours = {**OURS, "predictor": str(shipped), "prefetch_depth": 1} if shipped is not None else OURS
    _budget_runs(model, input_ids, new_tokens, pad, out, result, ours)
    moe_infer.executor(model).close()
    return result


def _check_moe(model_name: str) -> None:
    """A model directory without supported MoE blocks gets one `UnsupportedModel` before its weights
    are loaded (the check runs on the model built from its config on the meta device)."""
    if os.path.isdir(model_name) and model_name not in moe_infer.assets.names():
        from transformers import AutoConfig

        from moe_infer.experts.skeleton import skeleton

        find_moe_blocks(skeleton(AutoConfig.from_pretrained(model_name)))


def predictor_beside(model_name: str) -> Path | None:
    """The trained `expertflow` predictor shipped with a model (`predictor-expertflow.safetensors`
    in a shipped model's or a model directory's folder), or None."""
    if model_name in moe_infer.assets.names():
        return moe_infer.assets.predictor_path(model_name)
    file = Path(model_name) / moe_infer.assets.PREDICTOR_FILE
    return file if file.is_file() else None


def _budget_runs(model, input_ids, new_tokens: int, pad: int, expected, result: DemoResult, ours: dict) -> None:
    """Generate again with half the expert bytes, ours beside the plain LRU baseline."""
    ex = moe_infer.executor(model)
    total = sum(layer.expert_source.expert_nbytes() * layer.num_experts for layer in ex.layers)
    budget = max(int(total * BUDGET_FRACTION), max(layer.expert_source.expert_nbytes() for layer in ex.layers))
    tier = "gpu" if input_ids.device.type == "cuda" else "cpu"
    result.budget_bytes, result.expert_bytes_total = budget, total
    for label, fields in (("ours", ours), ("plain LRU", BASELINE)):
        moe_infer.wrap(model, **{f"{tier}_memory": budget}, **fields)
        _timed_generate(model, input_ids, 4, pad)  # warm-up: threads started, first loads
        ex.reset_stats()
        out, seconds = _timed_generate(model, input_ids, new_tokens, pad)
        stats = ex.stats()
        t = stats["tiers"][tier]
        result.budget_runs.append(BudgetRun(
            label, dict(fields), new_tokens / seconds, t["hits"] / max(t["hits"] + t["misses"], 1), t["bytes_moved"],
            stats["stall_seconds"], stats["cpu_computed_experts"], torch.equal(out, expected),
            stats.get("predictor_seconds", 0.0), seconds))
    moe_infer.wrap(model, gpu_memory=None, cpu_memory=None, **BASELINE)


def _slower_reason(ours: BudgetRun, baseline: BudgetRun, device: str) -> str:
    """Why ours trails plain LRU in tokens/s, in one line, from what the two runs measured: the time
    plain LRU lost waiting on its misses (all that fewer misses can win back) against the time
    ours spent predicting."""
    share = 100 * ours.predictor_seconds / ours.seconds if ours.seconds else 0.0
    where = "on a CPU a miss only copies an expert within memory: " if not device.startswith("cuda") else ""
    return (f"{where}plain LRU waited {baseline.stall_seconds:.3f} s on all its misses, while predicting took "
            f"{share:.0f}% of the decode time ({ours.predictor_seconds:.2f} s) and ours took "
            f"{ours.seconds - baseline.seconds:.2f} s longer in all; the hit rate and bytes moved are what carries "
            f"over to offloading over PCIe")


def format_report(result: DemoResult) -> str:
    lines = [
        f"model: {result.model_name}   device: {result.device}",
        f"wrapped vs original logits: max |diff| = {result.max_logit_diff:.2e}",
        "",
        "generated (greedy):",
        result.generated_text,
        "",
        f"decode: {result.tokens_per_s_wrapped:.1f} tokens/s wrapped, "
        f"{result.tokens_per_s_unwrapped:.1f} tokens/s original ({result.new_tokens} tokens, batch 1)",
        "",
        "expert activations per MoE layer during generation ((token, k) pairs per expert):",
    ]
    for layer_idx, layer in result.stats["layers"].items():
        counts = " ".join(f"{c:4d}" for c in layer["expert_counts"])
        lines.append(f"  layer {layer_idx:2d}: {counts}   imbalance {layer['load_imbalance']:.2f}")
    if result.budget_runs:
        lines += [
            "",
            f"experts under a budget: {result.budget_bytes / 2**20:.2f} MiB of {result.expert_bytes_total / 2**20:.2f} MiB "
            f"({100 * result.budget_bytes / result.expert_bytes_total:.0f}%), {result.new_tokens} tokens, batch 1",
            f"  {'run':10s} {'tokens/s':>9s} {'hit rate':>9s} {'moved MiB':>10s} {'stall s':>8s} {'CPU experts':>12s} "
            f"{'predict %':>9s}  same text",
        ]
        for run in result.budget_runs:
            share = 100 * run.predictor_seconds / run.seconds if run.seconds else 0.0
            lines.append(f"  {run.label:10s} {run.tokens_per_s:9.1f} {run.hit_rate:9.3f} {run.bytes_moved / 2**20:10.1f} "
                         f"{run.stall_seconds:8.3f} {run.cpu_computed_experts:12d} {share:9.1f}  "
                         f"{'yes' if run.same_tokens else 'NO'}")
        fields = result.budget_runs[0].fields
        ours = ", ".join(f"{k}={Path(v).name if k == 'predictor' else v}" for k, v in fields.items())
        lines.append(f"  ours = {ours}; plain LRU = on-demand LRU, no CPU compute (the mixtral-offloading design)")
        ours_run, baseline = result.budget_runs[0], result.budget_runs[-1]
        if ours_run.tokens_per_s < baseline.tokens_per_s:
            lines.append(f"  ours is slower here: {_slower_reason(ours_run, baseline, result.device)}")
    return "\n".join(lines)
