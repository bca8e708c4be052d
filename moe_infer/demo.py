"""`moe-infer demo`: wrap a small MoE model, prove the outputs are unchanged, generate, report.

The default model is the shipped `tiny-mixtral` (trained, so its routing has real structure);
`--model random-mixtral` builds an untrained Mixtral-shaped model from a config instead, and any
`transformers` directory works too. Runs on the CPU, and on the GPU when one is present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import moe_infer
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
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
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
    return DemoResult(model_name, str(device_t), max_diff, text, new_tokens,
                      new_tokens / seconds_wrapped, new_tokens / seconds_unwrapped, stats)


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
    return "\n".join(lines)
