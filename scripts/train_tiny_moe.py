#!/usr/bin/env python
"""Train the tiny byte-level MoE language models shipped in ``moe_infer/assets/``.

Two models, both in plain ``transformers`` format:

* ``tiny-mixtral``  -- ``MixtralForCausalLM``: every layer a sparse MoE block, 8 experts, top-2
  softmax routing, trained with the standard load-balancing auxiliary loss.
* ``tiny-deepseek`` -- ``DeepseekV3ForCausalLM``: first layer dense, then MoE layers with one
  shared expert and 32 fine-grained routed experts, sigmoid scores, grouped top-4 selection
  (4 groups, 2 kept) on ``score + e_score_correction_bias``.  The bias is trained with the
  auxiliary-loss-free balancing rule of DeepSeek-V3: after every optimizer step,
  ``bias += gamma * sign(mean_load - load)`` per MoE layer, where ``load`` counts the tokens
  each expert received in that step's batch.

The data is the Python standard library's own ``.py`` files (every machine has them), read as
bytes.  Files, not windows, are split into train / held-out by a stable hash of their path
relative to the stdlib root, so no held-out file is ever seen in training.  The vocabulary is
the 256 byte values (token id = byte value) plus ``<|endoftext|>`` (id 256), which separates
files and serves as eos / pad.

Training runs on the CPU in fp32 for a wall-time budget (``--minutes``) or a fixed number of
steps (``--steps``): AdamW, linear warm-up then cosine decay to 10 % of the peak rate, batches
of random windows of the concatenated training files.  At the end the script reports held-out
bits per byte next to a unigram byte model (estimated on the training split), measures routing
statistics on held-out text, saves the model, tokenizer and generation config with
``save_pretrained``, checks that ``AutoModelForCausalLM`` / ``AutoTokenizer`` reload it with
identical logits, and writes a model card (``README.md``) and ``training_summary.json``.

Usage::

    python scripts/train_tiny_moe.py --model tiny-mixtral --minutes 22 --seed 0
    python scripts/train_tiny_moe.py --model tiny-deepseek --minutes 1 --out /tmp/tiny-ds

Data order and initialisation depend only on ``--seed``.  With ``--minutes`` the learning-rate
schedule follows elapsed time, so the number of steps depends on the machine; the summary
records it, and ``--steps N`` reruns with a step-based schedule.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_infer.traces.corpus import EXCLUDED_DIRS, HELDOUT_RULE, is_heldout, stdlib_files

MODELS = ("tiny-mixtral", "tiny-deepseek")
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
VOCAB_SIZE = 257  # 256 byte values + <|endoftext|>
REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("def ", "import ", "class ", "    for ")
SAMPLE_PROMPTS = ("def ", "import os\n")


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def make_config(name: str):
    """The architecture of each shipped model (fp32 weights stay under 10 MB)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        max_position_embeddings=1024,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
        use_cache=True,
    )
    if name == "tiny-mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **common,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,  # per expert
            num_local_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            router_jitter_noise=0.0,
            output_router_logits=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
        )
    if name == "tiny-deepseek":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            **common,
            num_hidden_layers=5,
            first_k_dense_replace=1,
            intermediate_size=384,  # the dense first layer
            moe_intermediate_size=32,  # per routed expert (and per shared expert)
            n_shared_experts=1,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.0,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
            rope_interleave=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def moe_layer_indices(model) -> list[int]:
    cfg = model.config
    first_dense = getattr(cfg, "first_k_dense_replace", 0) or 0
    return [i for i in range(cfg.num_hidden_layers) if i >= first_dense]


def gate_module(model, layer: int):
    return model.model.layers[layer].mlp.gate


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (what ByteLevel pre-tokenizes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_tokenizer():
    """A fast byte tokenizer: token id = byte value (0..255), ``<|endoftext|>`` = 256.

    A BPE model with the 256 byte-level characters as its vocabulary and no merges, behind a
    ByteLevel pre-tokenizer (no prefix space, no regex split) and a ByteLevel decoder, so
    ``encode(text)`` gives the UTF-8 bytes and ``decode`` inverts it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    assert hf.convert_tokens_to_ids(EOS_TOKEN) == EOS_ID, "eos must be id 256"
    return hf


def check_tokenizer(tok) -> None:
    samples = ["def f(x):\n    return x  # ok\n", "héllo wörld — ∑ 日本 🐍", "\x00\x01\t\r\n  \x7f"]
    for s in samples:
        ids = tok(s)["input_ids"]
        if ids != list(s.encode("utf-8")):
            raise AssertionError(f"tokenizer does not give the UTF-8 bytes of {s!r}: {ids}")
        if tok.decode(ids) != s:
            raise AssertionError(f"tokenizer does not round-trip {s!r}: {tok.decode(ids)!r}")
    if tok("a" + EOS_TOKEN)["input_ids"] != [97, EOS_ID]:
        raise AssertionError("<|endoftext|> is not encoded as id 256")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def build_stream(paths: list[Path]) -> torch.Tensor:
    """All files' bytes, each followed by <|endoftext|>, as one int16 tensor."""
    parts = []
    eos = torch.tensor([EOS_ID], dtype=torch.int16)
    for p in paths:
        data = p.read_bytes()
        if data:
            parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16))
            parts.append(eos)
    return torch.cat(parts)


def load_data():
    root, files = stdlib_files()
    train = [p for rel, p in files if not is_heldout(rel)]
    held = [p for rel, p in files if is_heldout(rel)]
    train_stream, held_stream = build_stream(train), build_stream(held)
    info = {
        "stdlib_root": str(root),
        "python": platform.python_version(),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "heldout_rule": HELDOUT_RULE,
        "train_files": len(train),
        "heldout_files": len(held),
        "train_bytes": int((train_stream != EOS_ID).sum()),
        "heldout_bytes": int((held_stream != EOS_ID).sum()),
    }
    return train_stream, held_stream, info


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return stream[idx].long()


def eval_windows(stream: torch.Tensor, seq_len: int, max_bytes: int | None) -> torch.Tensor:
    """Non-overlapping windows of seq_len+1 tokens (overlapping by one, so every byte after the
    first of the stream is a target exactly once)."""
    n = (stream.numel() - 1) // seq_len
    if max_bytes is not None:
        n = min(n, max(1, max_bytes // seq_len))
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx].long()


def unigram_logprobs(train_stream: torch.Tensor) -> torch.Tensor:
    """log2 p(byte) with add-one smoothing, from the training split (eos excluded)."""
    counts = torch.bincount(train_stream[train_stream != EOS_ID].long(), minlength=256).double() + 1.0
    return torch.log2(counts / counts.sum())


# --------------------------------------------------------------------------------------------
# routing capture
# --------------------------------------------------------------------------------------------
class RouterCapture:
    """Forward hooks on the router modules; they return (logits, topk_weights, topk_indices)."""

    def __init__(self, model):
        self.layers = moe_layer_indices(model)
        self.indices: dict[int, torch.Tensor] = {}
        self.handles = [gate_module(model, l).register_forward_hook(self._hook(l)) for l in self.layers]

    def _hook(self, layer):
        def hook(module, args, output):
            self.indices[layer] = output[2].detach()

        return hook

    def clear(self):
        self.indices = {}

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def update_correction_bias(model, capture: RouterCapture, gamma: float) -> dict[int, float]:
    """DeepSeek-V3 auxiliary-loss-free balancing: bias += gamma * sign(mean_load - load).

    Returns max_load / mean_load per layer for this step (1.0 is perfectly balanced)."""
    imbalance = {}
    for layer in capture.layers:
        gate = gate_module(model, layer)
        ids = capture.indices[layer]
        load = torch.bincount(ids.reshape(-1), minlength=gate.num_experts).float()
        mean = load.mean()
        gate.e_score_correction_bias.add_(gamma * torch.sign(mean - load).to(gate.e_score_correction_bias.dtype))
        imbalance[layer] = float(load.max() / mean)
    return imbalance


def per_layer_aux_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch/Mixtral load-balancing loss computed per MoE layer and averaged over layers.

    ``MixtralForCausalLM`` pools the assignments of all layers before taking the product, which
    leaves each single layer free to collapse; here every layer is balanced on its own. Equal to
    ``top_k`` when the load is uniform."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, windows: torch.Tensor, unigram: torch.Tensor, batch: int, capture: RouterCapture | None = None):
    """Held-out bits/byte of the model and of the unigram model on the same targets (eos excluded),
    and, with a capture, the routing of every MoE layer on the held-out tokens (eos included)."""
    was_training = model.training
    model.eval()
    tot_bits, tot_uni, tot_n = 0.0, 0.0, 0
    routes: dict[int, list[torch.Tensor]] = {}
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        x, y = w[:, :-1], w[:, 1:]
        if capture is not None:
            capture.clear()
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        mask = (y.reshape(-1) != EOS_ID)
        tot_bits += float(nll[mask].sum()) / math.log(2)
        tot_uni += float(-unigram[y.reshape(-1)[mask]].sum())
        tot_n += int(mask.sum())
        if capture is not None:
            for layer, ids in capture.indices.items():
                routes.setdefault(layer, []).append(ids.reshape(x.shape[0], x.shape[1], -1))
    model.train(was_training)
    result = {"model_bpb": tot_bits / tot_n, "unigram_bpb": tot_uni / tot_n, "bytes": tot_n}
    if capture is not None:
        result["routes"] = {l: torch.cat(v) for l, v in routes.items()}  # [windows, T, K]
    return result


def correction_bias_ranges(model) -> dict[str, list[float]]:
    """[min, max] of each MoE layer's e_score_correction_bias (empty for models without one)."""
    out = {}
    for layer in moe_layer_indices(model):
        bias = getattr(gate_module(model, layer), "e_score_correction_bias", None)
        if bias is not None:
            out[str(layer)] = [round(float(bias.min()), 4), round(float(bias.max()), 4)]
    return out


def routing_stats(routes: dict[int, torch.Tensor], num_experts: int) -> dict:
    """Per MoE layer: load share per expert, load entropy, mean overlap of consecutive tokens'
    expert sets against the overlap expected if tokens chose independently."""
    stats = {}
    layers = sorted(routes)
    for layer in layers:
        ids = routes[layer]  # [N, T, K]
        k = ids.shape[-1]
        load = torch.bincount(ids.reshape(-1), minlength=num_experts).double()
        share = load / load.sum()
        nz = share[share > 0]
        entropy = float(-(nz * nz.log2()).sum())
        used = torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.bool).scatter_(-1, ids, True)  # [N, T, E]
        overlap = float((used[:, 1:] & used[:, :-1]).sum(-1).double().mean() / k)
        p_in = (share * k).clamp(max=1.0)  # P(expert in a token's set)
        overlap_indep = float((p_in * p_in).sum() / k)
        stats[layer] = {
            "load_share": [round(float(s), 4) for s in share],
            "load_entropy_bits": round(entropy, 3),
            "max_entropy_bits": round(math.log2(num_experts), 3),
            "max_over_mean_load": round(float(share.max() * num_experts), 3),
            "min_over_mean_load": round(float(share.min() * num_experts), 3),
            "consecutive_overlap": round(overlap, 3),
            "consecutive_overlap_if_independent": round(overlap_indep, 3),
        }
    # cross-layer: how predictable is layer l+1's top-1 expert from layer l's top-1 expert
    cross = {}
    for a, b in zip(layers, layers[1:]):
        ea, eb = routes[a][..., 0].reshape(-1), routes[b][..., 0].reshape(-1)
        joint = torch.bincount(ea * num_experts + eb, minlength=num_experts**2).double().reshape(num_experts, num_experts)
        pj = joint / joint.sum()
        pa, pb = pj.sum(1, keepdim=True), pj.sum(0, keepdim=True)
        nzm = pj > 0
        mi = float((pj[nzm] * (pj[nzm] / (pa @ pb)[nzm]).log2()).sum())
        cross[f"{a}->{b}"] = round(mi, 3)
    return {"per_layer": stats, "top1_mutual_information_bits": cross}


@torch.no_grad()
def generate_samples(model, tok, seed: int = 0) -> dict[str, dict[str, str]]:
    """Greedy continuations of PROMPTS (160 new bytes) and seeded samples at temperature 0.8
    (240 new bytes)."""
    model.eval()
    out = {"greedy": {}, "sampled": {}}
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=160, do_sample=False)
        out["greedy"][prompt] = tok.decode(gen[0], skip_special_tokens=False)
    for prompt in SAMPLE_PROMPTS:
        torch.manual_seed(seed)
        enc = tok(prompt, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=240, do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
        out["sampled"][prompt] = tok.decode(gen[0], skip_special_tokens=False)
    return out


# --------------------------------------------------------------------------------------------
# save + check
# --------------------------------------------------------------------------------------------
def save_and_check(model, tok, out_dir: Path, probe: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=False, max_new_tokens=256
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    check_tokenizer(tok2)
    with torch.no_grad():
        a = model(input_ids=probe, use_cache=False).logits
        b = reloaded(input_ids=probe, use_cache=False).logits
    if not torch.equal(a, b):
        raise AssertionError(f"reloaded model differs: max |diff| = {(a - b).abs().max():.3g}")
    sizes = _file_sizes(out_dir)
    return {"reload_identical_logits": True, "files": sizes}


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------
def _fmt_share(share: list[float]) -> str:
    return " ".join(f"{100 * s:.1f}" for s in share)


PREDICTOR_NOTE = (
    "`predictor-expertflow.safetensors` (not written by this script): an `expertflow` routing predictor for "
    "this model, which `moe-infer demo` prefetches with (`moe_infer.assets.predictor_path`). Trained with "
    "`moe-infer predictor train --kind expertflow --trace W/{name}-train.safetensors --option epochs=5 --out ...` "
    "on the training trace that `moe-infer bench predictors --work-dir W` records (500k tokens from every 2nd "
    "training-split file); its held-out recall is in `bench/results/predictors.md`.")


def write_model_card(out_dir: Path, summary: dict) -> None:
    name, cfg, tr, ev, rs = summary["model"], summary["config"], summary["training"], summary["eval"], summary["routing"]
    d = summary["data"]
    if name == "tiny-mixtral":
        arch = (
            f"`MixtralForCausalLM`: {cfg['num_hidden_layers']} layers, all sparse MoE; hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} attention heads ({cfg['num_key_value_heads']} KV heads, head dim {cfg['head_dim']}); "
            f"{cfg['num_local_experts']} experts per layer, top-{cfg['num_experts_per_tok']} softmax routing "
            f"(renormalised), expert intermediate size {cfg['intermediate_size']}, SiLU. "
            f"Balanced with the standard Switch/Mixtral load-balancing auxiliary loss, computed per layer and "
            f"averaged over layers (coefficient {cfg['router_aux_loss_coef']})."
        )
        num_experts = cfg["num_local_experts"]
    else:
        arch = (
            f"`DeepseekV3ForCausalLM`: {cfg['num_hidden_layers']} layers, the first {cfg['first_k_dense_replace']} dense "
            f"(intermediate {cfg['intermediate_size']}), the rest MoE with {cfg['n_shared_experts']} shared expert and "
            f"{cfg['n_routed_experts']} routed experts (intermediate {cfg['moe_intermediate_size']} each); "
            f"sigmoid scores, grouped top-{cfg['num_experts_per_tok']} selection on score + `e_score_correction_bias` "
            f"({cfg['n_group']} groups, {cfg['topk_group']} kept), weights renormalised (norm_topk_prob="
            f"{cfg['norm_topk_prob']}) and scaled by routed_scaling_factor={cfg['routed_scaling_factor']}. "
            f"MLA attention: {cfg['num_attention_heads']} heads, q_lora_rank {cfg['q_lora_rank']}, kv_lora_rank "
            f"{cfg['kv_lora_rank']}, qk_nope {cfg['qk_nope_head_dim']} + qk_rope {cfg['qk_rope_head_dim']}, v "
            f"{cfg['v_head_dim']}. Hidden {cfg['hidden_size']}. No auxiliary loss: the correction bias is trained with "
            f"the auxiliary-loss-free rule `bias += {tr['bias_gamma']} * sign(mean_load - load)` after every step."
        )
        num_experts = cfg["n_routed_experts"]
    lines = [
        f"# {name}",
        "",
        "A tiny byte-level Mixture-of-Experts causal LM shipped with `moe_infer`, trained by "
        "`scripts/train_tiny_moe.py`. It is a test and demo model whose routing was learned from real text, "
        "not a useful code model.",
        "",
        "```python",
        "import moe_infer.assets",
        f'model, tok = moe_infer.assets.load_model("{name}")',
        "```",
        "",
        "## Architecture",
        "",
        arch,
        "",
        f"Parameters: {summary['params']:,} ({summary['params_active_per_token']:,} active per token). "
        f"Vocabulary: {cfg['vocab_size']} tokens: the 256 byte values (token id = byte value) and "
        f"`{EOS_TOKEN}` (id {EOS_ID}, eos and pad, also the file separator in training). "
        f"Context: max_position_embeddings {cfg['max_position_embeddings']}, trained on {tr['seq_len']}-byte windows. "
        "Weights fp32, `model.safetensors`.",
        "",
        "## Data",
        "",
        f"The `.py` files of the Python {d['python']} standard library (`sysconfig.get_paths()['stdlib']`, "
        f"recursively, skipping the directories {', '.join('`' + x + '`' for x in d['excluded_dirs'])}), read as bytes, "
        f"sorted by path, each followed by `{EOS_TOKEN}`. Files are split by `{d['heldout_rule']}` on the path relative "
        f"to the stdlib root: {d['train_files']} training files ({d['train_bytes']:,} bytes), {d['heldout_files']} "
        f"held-out files ({d['heldout_bytes']:,} bytes).",
        "",
        "## Training",
        "",
        f"CPU, fp32, {tr['threads']} thread(s), seed {tr['seed']}: {tr['steps']} AdamW steps (peak lr {tr['lr']}, betas "
        f"{tuple(tr['betas'])}, weight decay {tr['weight_decay']} on matrices, grad-norm clip {tr['grad_clip']}), "
        f"{tr['warmup']} warm-up then cosine decay to 10 % of the peak, following {tr['schedule']}; "
        f"batches of {tr['batch']} random {tr['seq_len']}-byte windows ({tr['tokens_seen']:,} tokens seen, "
        f"{tr['tokens_seen'] / max(1, d['train_bytes']):.2f} epochs). Wall time {tr['wall_minutes']:.1f} min "
        f"({tr['tokens_per_second']:.0f} tokens/s). Trained {summary['date']} with torch {summary['torch']}, "
        f"transformers {summary['transformers']}.",
        "",
        f"Command: `{summary['command']}`",
        "",
        "## Held-out results",
        "",
        f"On {ev['bytes']:,} bytes of the held-out files ({tr['seq_len']}-byte windows, eos targets excluded):",
        "",
        "| model | bits/byte |",
        "|---|---|",
        f"| {name} | **{ev['model_bpb']:.3f}** |",
        f"| unigram byte model (training-split frequencies, add-one) | {ev['unigram_bpb']:.3f} |",
        "",
        "## Routing statistics (held-out text)",
        "",
        "Load share = fraction of the token-to-expert assignments (top-k) an expert receives, in percent, "
        f"expert 0 first. Entropy of the load distribution in bits (maximum log2({num_experts}) = "
        f"{math.log2(num_experts):.2f}). Overlap = mean fraction of a token's experts that the previous token also "
        "used, next to what independent choices with the same loads would give.",
        "",
        "| layer | load entropy (bits) | max / mean load | min / mean load | consecutive overlap (independent) | load share % |",
        "|---|---|---|---|---|---|",
    ]
    for layer, s in rs["per_layer"].items():
        lines.append(
            f"| {layer} | {s['load_entropy_bits']:.3f} | {s['max_over_mean_load']:.2f} | {s['min_over_mean_load']:.2f} | "
            f"{s['consecutive_overlap']:.3f} ({s['consecutive_overlap_if_independent']:.3f}) | {_fmt_share(s['load_share'])} |"
        )
    if rs.get("correction_bias_range"):
        lines += [
            "",
            "Learned `e_score_correction_bias` per layer (min .. max; only differences between experts matter): "
            + ", ".join(f"layer {k}: {v[0]:+.3f} .. {v[1]:+.3f}" for k, v in rs["correction_bias_range"].items())
            + ".",
        ]
    lines += [
        "",
        "Mutual information between the top-1 experts of consecutive MoE layers (bits): "
        + ", ".join(f"{k}: {v:.3f}" for k, v in rs["top1_mutual_information_bits"].items())
        + ".",
        "",
        "## Samples",
        "",
        "Greedy decoding, 160 new bytes (greedy byte-level decoding soon falls into loops of spaces or phrases):",
        "",
    ]
    for prompt, text in summary["samples"]["greedy"].items():
        lines += [f"Prompt `{prompt!r}`:", "", "```", text.replace("```", "'''"), "```", ""]
    lines += [f"Sampled at temperature 0.8, 240 new bytes, `torch.manual_seed({summary['training']['seed']})`:", ""]
    for prompt, text in summary["samples"]["sampled"].items():
        lines += [f"Prompt `{prompt!r}`:", "", "```", text.replace("```", "'''"), "```", ""]
    lines += [
        "## Files",
        "",
        "`config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json` + `tokenizer_config.json` "
        "(a `tokenizers` byte-level model, loads with `AutoTokenizer.from_pretrained`), `training_summary.json` "
        "(every number on this page). Reload checked: `AutoModelForCausalLM.from_pretrained` gives identical logits.",
        "",
        PREDICTOR_NOTE.format(name=name),
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def count_active(model, cfg) -> int:
    total = sum(p.numel() for p in model.parameters())
    expert_params = 0
    active = 0
    for layer in moe_layer_indices(model):
        ex = model.model.layers[layer].mlp.experts
        n = ex.gate_up_proj.numel() + ex.down_proj.numel()
        expert_params += n
        active += n * cfg.num_experts_per_tok // ex.num_experts
    return total - expert_params + active


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--minutes", type=float, default=22.0, help="wall-time budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead (step-based schedule)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default moe_infer/assets/<model>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps (a time budget uses the same share of time)")
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free bias update speed (DeepSeek)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--eval-every", type=float, default=240.0, help="seconds between quick held-out evaluations")
    ap.add_argument("--eval-bytes", type=int, default=None, help="cap on held-out bytes in the final evaluation")
    ap.add_argument(
        "--card-only", action="store_true",
        help="do not train: regenerate the samples, training_summary.json and README.md of the model in --out",
    )
    return ap.parse_args(argv)


def _file_sizes(out_dir: Path) -> dict[str, int]:
    skip = ("README.md", "training_summary.json")
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file() and p.name not in skip}


def rewrite_card(out_dir: Path, threads: int) -> int:
    """Regenerate the samples and the model card of an already trained model from its summary."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    summary = json.loads((out_dir / "training_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    summary["samples"] = generate_samples(model, AutoTokenizer.from_pretrained(out_dir), summary["training"]["seed"])
    summary["config"] = json.loads((out_dir / "config.json").read_text())
    summary["files"] = _file_sizes(out_dir)
    summary["routing"]["correction_bias_range"] = correction_bias_ranges(model)
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(out_dir, summary)
    print(f"rewrote {out_dir / 'README.md'}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.card_only:
        return rewrite_card(args.out or REPO_ROOT / "moe_infer" / "assets" / args.model, args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    out_dir = args.out or REPO_ROOT / "moe_infer" / "assets" / args.model
    t_start = time.time()

    train_stream, held_stream, data_info = load_data()
    unigram = unigram_logprobs(train_stream)
    print(
        f"data: {data_info['train_files']} train files ({data_info['train_bytes']:,} B), "
        f"{data_info['heldout_files']} held-out files ({data_info['heldout_bytes']:,} B) from {data_info['stdlib_root']}",
        flush=True,
    )

    tok = make_tokenizer()
    check_tokenizer(tok)
    cfg = make_config(args.model)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    is_mixtral = args.model == "tiny-mixtral"
    n_params = sum(p.numel() for p in model.parameters())
    n_active = count_active(model, cfg)
    print(f"{args.model}: {n_params:,} parameters ({n_active:,} active per token), MoE layers {moe_layer_indices(model)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    betas = (0.9, 0.95)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=betas, eps=1e-8,
    )
    grad_clip = 1.0
    capture = RouterCapture(model) if not is_mixtral else None
    gen = torch.Generator().manual_seed(args.seed)
    quick_eval = eval_windows(held_stream, args.seq_len, 32 * 1024)

    budget = None if args.steps is not None else args.minutes * 60.0
    warm_frac = None
    step, tokens = 0, 0
    t0 = time.time()
    last_log = last_eval = t0
    run_loss, run_aux, run_n = 0.0, 0.0, 0
    run_imb: list[float] = []
    history = []
    while True:
        elapsed = time.time() - t0
        if args.steps is not None:
            if step >= args.steps:
                break
            progress = step / args.steps
            warm = min(1.0, (step + 1) / args.warmup)
        else:
            if elapsed >= budget:
                break
            progress = elapsed / budget
            if step == args.warmup and warm_frac is None:
                warm_frac = progress  # time share the warm-up steps took
            warm = min(1.0, (step + 1) / args.warmup)
        decay_progress = progress if warm_frac is None else (progress - warm_frac) / max(1e-9, 1 - warm_frac)
        if step < args.warmup:
            lr = args.lr * warm
        else:
            if args.steps is not None:
                decay_progress = (step - args.warmup) / max(1, args.steps - args.warmup)
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, decay_progress)))))
        for g in opt.param_groups:
            g["lr"] = lr

        batch = sample_batch(train_stream, args.batch, args.seq_len, gen)
        x, y = batch[:, :-1], batch[:, 1:]
        if capture is not None:
            capture.clear()
        out = model(input_ids=x, use_cache=False, output_router_logits=is_mixtral)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        loss = ce
        if is_mixtral:
            aux = per_layer_aux_loss(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
            loss = ce + cfg.router_aux_loss_coef * aux
            run_aux += float(aux.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if capture is not None:
            imb = update_correction_bias(model, capture, args.bias_gamma)
            run_imb.append(max(imb.values()))
        step += 1
        tokens += x.numel()
        run_loss += ce.item() / math.log(2)
        run_n += 1

        now = time.time()
        if now - last_log >= args.log_every:
            msg = (
                f"step {step:5d}  {(now - t0) / 60:5.1f} min  lr {lr:.2e}  train {run_loss / run_n:.3f} bits/byte  "
                f"{tokens / (now - t0):.0f} tok/s"
            )
            if is_mixtral:
                msg += f"  aux {run_aux / run_n:.3f} (balanced = {cfg.num_experts_per_tok})"
            if run_imb:
                biases = torch.stack([gate_module(model, l).e_score_correction_bias for l in capture.layers])
                msg += f"  max/mean load {sum(run_imb) / len(run_imb):.2f}  |bias| max {float(biases.abs().max()):.3f}"
            print(msg, flush=True)
            history.append({"step": step, "minutes": round((now - t0) / 60, 2), "train_bpb": round(run_loss / run_n, 4)})
            last_log, run_loss, run_aux, run_n, run_imb = now, 0.0, 0.0, 0, []
        if now - last_eval >= args.eval_every:
            r = evaluate(model, quick_eval, unigram, args.batch * 2)
            print(f"  held-out (32 KiB): {r['model_bpb']:.3f} bits/byte (unigram {r['unigram_bpb']:.3f})", flush=True)
            history.append({"step": step, "minutes": round((now - t0) / 60, 2), "heldout32k_bpb": round(r["model_bpb"], 4)})
            last_eval = time.time()
    train_seconds = time.time() - t0
    print(f"trained {step} steps in {train_seconds / 60:.1f} min ({tokens:,} tokens)", flush=True)
    if capture is not None:
        capture.remove()

    # final evaluation with routing statistics
    model.eval()
    capture = RouterCapture(model)
    final = evaluate(model, eval_windows(held_stream, args.seq_len, args.eval_bytes), unigram, args.batch * 2, capture)
    capture.remove()
    num_experts = cfg.num_local_experts
    rstats = routing_stats(final.pop("routes"), num_experts)
    rstats["correction_bias_range"] = correction_bias_ranges(model)
    print(f"held-out: {final['model_bpb']:.4f} bits/byte   unigram: {final['unigram_bpb']:.4f} bits/byte   ({final['bytes']:,} bytes)", flush=True)
    for layer, s in rstats["per_layer"].items():
        print(
            f"  layer {layer}: load entropy {s['load_entropy_bits']:.3f}/{s['max_entropy_bits']:.3f} bits, max/mean "
            f"{s['max_over_mean_load']:.2f}, min/mean {s['min_over_mean_load']:.2f}, consecutive overlap "
            f"{s['consecutive_overlap']:.3f} (independent {s['consecutive_overlap_if_independent']:.3f})",
            flush=True,
        )
    print(f"  top-1 MI between consecutive layers (bits): {rstats['top1_mutual_information_bits']}", flush=True)

    probe = eval_windows(held_stream, 128, 4 * 128)
    saved = save_and_check(model, tok, out_dir, probe)
    from transformers import AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    samples = generate_samples(reloaded, AutoTokenizer.from_pretrained(out_dir), args.seed)
    for kind, texts in samples.items():
        for prompt, text in texts.items():
            print(f"--- {kind} from {prompt!r}:\n{text}", flush=True)

    summary = {
        "model": args.model,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python scripts/train_tiny_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "params": n_params,
        "params_active_per_token": n_active,
        "config": cfg.to_dict(),
        "data": data_info,
        "training": {
            "seed": args.seed,
            "threads": args.threads,
            "steps": step,
            "tokens_seen": tokens,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "betas": list(betas),
            "weight_decay": args.weight_decay,
            "grad_clip": grad_clip,
            "warmup": f"{args.warmup} steps",
            "schedule": "elapsed wall time" if args.steps is None else "step count",
            "bias_gamma": args.bias_gamma if not is_mixtral else None,
            "router_aux_loss_coef": cfg.router_aux_loss_coef if is_mixtral else None,
            "wall_minutes": round(train_seconds / 60, 2),
            "tokens_per_second": round(tokens / train_seconds, 1),
            "history": history,
        },
        "eval": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()},
        "routing": rstats,
        "samples": samples,
        "files": saved["files"],
    }
    # the card lists the config as saved (from config.json), so the numbers match the shipped files
    summary["config"] = json.loads((out_dir / "config.json").read_text())
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(out_dir, summary)
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"saved to {out_dir} ({total / 1e6:.2f} MB); reload gives identical logits", flush=True)
    print(f"FINAL {args.model}: held-out {final['model_bpb']:.4f} bits/byte vs unigram {final['unigram_bpb']:.4f} "
          f"after {step} steps, {train_seconds / 60:.1f} min (total {(time.time() - t_start) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
