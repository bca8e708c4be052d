"""`moe-infer demo`: wrap a small MoE model, prove the outputs are unchanged, generate, report.

The default model is the shipped `tiny-mixtral` (trained, so its routing has real structure);
`--model random-mixtral` builds an untrained Mixtral-shaped model from a config instead, and any
`transformers` directory works too. Runs on the CPU, and on the GPU when one is present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

import moe_infer

RANDOM_MODEL = "random-mixtral"


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


def _random_mixtral() -> tuple[nn.Module, None]:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024, bos_token_id=None,
                           eos_token_id=None, pad_token_id=0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    return model, None


def load_demo_model(name: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer or None): a shipped asset name, "random-mixtral", or a transformers directory."""
    from moe_infer import assets

    if name == RANDOM_MODEL:
        model, tokenizer = _random_mixtral()
    elif name in assets.names():
        model, tokenizer = assets.load_model(name, dtype=dtype)
    else:
        import os

        if not os.path.isdir(name):
            raise ValueError(f"--model {name!r}: not a shipped model ({', '.join(assets.names()) or 'none'}), "
                             f"not {RANDOM_MODEL!r}, and not a directory")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(name) if os.path.exists(os.path.join(name, "tokenizer_config.json")) else None
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _encode(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"] if tokenizer is not None else list(text.encode("utf-8"))
    return torch.tensor([ids], device=device)


def _decode(tokenizer, ids: list[int]) -> str:
    if tokenizer is not None:
        return tokenizer.decode(ids)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


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
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_t = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model, tokenizer = load_demo_model(model_name, device_t, dtype_t)
    input_ids = _encode(tokenizer, prompt, device_t)
    pad = getattr(tokenizer, "pad_token_id", None) or 0

    reference_logits = model(input_ids).logits
    _timed_generate(model, input_ids, 4, pad)  # warm-up, so neither timing pays for first calls
    _, seconds_unwrapped = _timed_generate(model, input_ids, new_tokens, pad)

    moe_infer.wrap(model)
    max_diff = (model(input_ids).logits - reference_logits).abs().max().item()
    moe_infer.executor(model).reset_stats()
    out, seconds_wrapped = _timed_generate(model, input_ids, new_tokens, pad)
    stats = moe_infer.executor(model).stats()
    text = _decode(tokenizer, out[0].tolist())
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
