"""Tiny random-weight models of every MoE family `moe_infer.families.FAMILIES` claims to support.

`TINY_MODELS` maps a case name to a `TinyModel`: the `transformers` config and model classes, the
config keywords (shared base: hidden 64, 4 heads, 2 kv heads, vocab 256, 8 experts, small
intermediate sizes) and the MoE layer indices that config implies, written out by hand from the
family's interleaving settings so the tests do not derive them with the code under test.

`build(name, seed, dtype)` returns an eval-mode model with deterministic random weights. Every
parameter that `transformers` initialises to zero (router and expert biases, attention sinks, norm
offsets) and every routing-bias buffer (`e_score_correction_bias`, `expert_bias`) is randomised:
a routing adapter that forgets a bias must make the tests fail.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import transformers
from torch import nn

import moe_infer

VOCAB_SIZE = 256
BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Multi-head latent attention (DeepSeek-V2/V3 and their copies): kv 4 as the MLA code expects
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
           num_key_value_heads=4)
# buffers that hold routing biases (zero at init in transformers)
ROUTING_BIAS_BUFFERS = ("e_score_correction_bias", "expert_bias")


@dataclass(frozen=True)
class TinyModel:
    config_class: str
    model_class: str
    kwargs: dict
    moe_layers: tuple[int, ...]  # the layers whose MLP is a sparse MoE block, from the config
    router_class: str  # the router class FAMILIES must list for this case
    aux_loss: bool = False  # the ForCausalLM returns a load-balancing aux_loss with output_router_logits
    top_k: int = 2


def _tm(config_class, model_class, router_class, moe_layers, aux_loss=False, top_k=2, **kwargs):
    return TinyModel(config_class, model_class, {**BASE, "num_hidden_layers": 2, **kwargs}, tuple(moe_layers),
                     router_class, aux_loss, top_k)


_QWEN2 = dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
              num_experts_per_tok=2)
_DSV3 = dict(MLA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             first_k_dense_replace=1, num_hidden_layers=3)

TINY_MODELS: dict[str, TinyModel] = {
    "mixtral": _tm("MixtralConfig", "MixtralForCausalLM", "MixtralTopKRouter", [0, 1], aux_loss=True,
                   intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    # layers alternate full and lightning (linear) attention; every layer is MoE
    "minimax": _tm("MiniMaxConfig", "MiniMaxForCausalLM", "MiniMaxTopKRouter", [0, 1], aux_loss=True,
                   intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, block_size=16, head_dim=16),
    "qwen2_moe": _tm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter", [0, 1], aux_loss=True,
                     **_QWEN2, norm_topk_prob=False),
    "qwen2_moe_norm_topk": _tm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter", [0, 1],
                               aux_loss=True, **_QWEN2, norm_topk_prob=True),
    # decoder_sparse_step=2: MoE where (i + 1) % 2 == 0, i.e. layers 1 and 3; layer 3 forced dense
    "qwen2_moe_sparse_step": _tm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter", [1],
                                 aux_loss=True, **_QWEN2, num_hidden_layers=4, decoder_sparse_step=2,
                                 mlp_only_layers=[3]),
    # mlp_only_layers alone: layers 0 and 2 dense
    "qwen3_moe_mlp_only": _tm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter", [1, 3],
                              aux_loss=True, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2, head_dim=16, num_hidden_layers=4, mlp_only_layers=[0, 2]),
    "qwen3_moe": _tm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter", [0, 1], aux_loss=True,
                     intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                     head_dim=16),
    # linear attention (gated delta net) then full attention; every layer MoE with a gated shared expert
    "qwen3_next": _tm("Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextTopKRouter", [0, 1], aux_loss=True,
                      **_QWEN2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention",
                                                                                      "full_attention"]),
    "olmoe": _tm("OlmoeConfig", "OlmoeForCausalLM", "OlmoeTopKRouter", [0, 1], aux_loss=True,
                 intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "flex_olmo": _tm("FlexOlmoConfig", "FlexOlmoForCausalLM", "FlexOlmoTopKRouter", [0, 1], aux_loss=True,
                     intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    # mamba everywhere except attention at layer 2 (attn period 4, offset 2); MoE at odd layers
    "jamba": _tm("JambaConfig", "JambaForCausalLM", "JambaTopKRouter", [1, 3], aux_loss=True,
                 num_hidden_layers=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
                 mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2),
    "hunyuan_v1_moe": _tm("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Gate", [0, 1],
                          intermediate_size=32, num_experts=8, moe_topk=2, head_dim=16),
    "gpt_oss": _tm("GptOssConfig", "GptOssForCausalLM", "GptOssTopKRouter", [0, 1], aux_loss=True,
                   intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": _tm("GraniteMoeConfig", "GraniteMoeForCausalLM", "GraniteMoeTopKRouter", [0, 1], aux_loss=True,
                      intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=2.0,
                      residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0),
    "granitemoeshared": _tm("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", "GraniteMoeSharedTopKRouter",
                            [0, 1], aux_loss=True, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                            shared_intermediate_size=48, residual_multiplier=0.5),
    # mamba2 then attention; every layer MoE plus the layer's shared MLP
    "granitemoehybrid": _tm("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridTopKRouter",
                            [0, 1], aux_loss=True, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                            shared_intermediate_size=48, layer_types=["mamba", "attention"], mamba_n_heads=8,
                            mamba_d_state=16, mamba_d_head=16, mamba_chunk_size=16, residual_multiplier=0.5),
    "deepseek_v2": _tm("DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2TopkRouter", [1, 2],
                       **{**_DSV3, "routed_scaling_factor": 1.5, "topk_method": "greedy", "n_group": None,
                          "topk_group": None}),
    "deepseek_v2_group_limited": _tm("DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2TopkRouter", [1, 2],
                                     top_k=3, **{**_DSV3, "routed_scaling_factor": 1.5, "num_experts_per_tok": 3,
                                        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    "deepseek_v3": _tm("DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3TopkRouter", [1, 2], **_DSV3),
    "deepseek_v32": _tm("DeepseekV32Config", "DeepseekV32ForCausalLM", "DeepseekV32TopkRouter", [1, 2],
                        **_DSV3, index_topk=16, index_head_dim=16, index_n_heads=2, head_dim=8),
    "glm4_moe": _tm("Glm4MoeConfig", "Glm4MoeForCausalLM", "Glm4MoeTopkRouter", [1, 2], num_hidden_layers=3,
                    intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                    n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                    head_dim=16),
    # dense, sparse, dense, sparse through mlp_layer_types
    "glm4_moe_lite": _tm("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", "Glm4MoeLiteTopkRouter", [1, 3],
                         **{**_DSV3, "num_hidden_layers": 4}, mlp_layer_types=["dense", "sparse", "dense", "sparse"]),
    "dots1": _tm("Dots1Config", "Dots1ForCausalLM", "Dots1TopkRouter", [1, 2], num_hidden_layers=3,
                 intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                 topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, head_dim=16),
    "exaone_moe": _tm("ExaoneMoeConfig", "ExaoneMoeForCausalLM", "ExaoneMoeTopkRouter", [1, 2],
                      num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1,
                      routed_scaling_factor=2.5, first_k_dense_replace=1, head_dim=16, sliding_window=8),
    "minimax_m2": _tm("MiniMaxM2Config", "MiniMaxM2ForCausalLM", "MiniMaxM2TopKRouter", [0, 1], aux_loss=True,
                      intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    # conv, attention, conv: layer 0 dense (num_dense_layers=1)
    "lfm2_moe": _tm("Lfm2MoeConfig", "Lfm2MoeForCausalLM", "Lfm2MoeTopKRouter", [1, 2], num_hidden_layers=3,
                    intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                    num_dense_layers=1, use_expert_bias=True, routed_scaling_factor=1.5,
                    layer_types=["conv", "full_attention", "conv"]),
    "lfm2_moe_no_bias": _tm("Lfm2MoeConfig", "Lfm2MoeForCausalLM", "Lfm2MoeTopKRouter", [1, 2], num_hidden_layers=3,
                            intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            num_dense_layers=1, use_expert_bias=False, layer_types=["conv", "full_attention", "conv"]),
    # MoE from layer 1 on
    "ernie4_5_moe": _tm("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeTopKRouter", [1, 2],
                        aux_loss=True, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
    "phimoe": _tm("PhimoeConfig", "PhimoeForCausalLM", "PhimoeTopKRouter", [0, 1], aux_loss=True,
                  intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
}



@dataclass(frozen=True)
class OtherModel:
    """A model `wrap` must refuse: not MoE at all, or MoE in a family moe_infer does not support."""

    config_class: str
    model_class: str
    kwargs: dict
    block_class: str | None  # the MoE block class the refusal must name (None: not an MoE model)


_DENSE = dict(BASE, num_hidden_layers=2, intermediate_size=32)
OTHER_MODELS: dict[str, OtherModel] = {
    "llama": OtherModel("LlamaConfig", "LlamaForCausalLM", _DENSE, None),
    # transformers 5.23 crashes on DBRX with clip_qkv=None
    "dbrx": OtherModel("DbrxConfig", "DbrxForCausalLM",
                       dict(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, pad_token_id=0,
                            attn_config={"rope_theta": 10000, "clip_qkv": 8, "kv_n_heads": 2},
                            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
                       "DbrxFFN"),
    "llama4_text": OtherModel("Llama4TextConfig", "Llama4ForCausalLM",
                              dict(_DENSE, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
                                   head_dim=16), "Llama4TextMoe"),
    "jetmoe": OtherModel("JetMoeConfig", "JetMoeForCausalLM",
                         dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                              kv_channels=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                              pad_token_id=0), "JetMoeMoE"),
}

CASES = tuple(TINY_MODELS)  # test ids; a case that is not a family of its own exercises a switch of one
PAD_TOKEN_ID = BASE["pad_token_id"]
FIRST_TEXT_TOKEN = 3  # prompts avoid pad, bos and eos


def config(name: str):
    spec = TINY_MODELS[name] if name in TINY_MODELS else OTHER_MODELS[name]
    return getattr(transformers, spec.config_class)(**spec.kwargs)


@torch.no_grad()
def randomize_zero_init(model: nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Give every all-zero floating parameter and every routing-bias buffer random values."""
    for _, param in model.named_parameters():
        if param.is_floating_point() and not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    for name, buffer in model.named_buffers():
        if name.rsplit(".", 1)[-1] in ROUTING_BIAS_BUFFERS:
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * std)


def build(name: str, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An eval-mode model of `TINY_MODELS` or `OTHER_MODELS` with deterministic random weights
    (built in fp32, then cast)."""
    spec = TINY_MODELS[name] if name in TINY_MODELS else OTHER_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config(name))
    randomize_zero_init(model, torch.Generator().manual_seed(seed + 1))
    model.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        # as from_pretrained(dtype=...) does: these tensors stay fp32 in half-precision models
        keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and any(pattern in tensor_name for pattern in keep_fp32):
                tensor.data = tensor.data.float()
    # no end-of-sequence token: every generate() call runs its full length
    model.generation_config.eos_token_id = None
    return model.eval()


def token_ids(seed: int, batch: int, length: int) -> torch.Tensor:
    """Random prompt tokens [batch, length] (no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TEXT_TOKEN, VOCAB_SIZE, (batch, length), generator=generator)


def left_padded(seed: int, lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of prompts of the given lengths: (input_ids, attention_mask) [B, max(lengths)]."""
    width = max(lengths)
    ids = token_ids(seed, len(lengths), width)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return ids.masked_fill(mask == 0, PAD_TOKEN_ID), mask


@contextlib.contextmanager
def wrapped(model: nn.Module, **fields):
    """`moe_infer.wrap(model)` for the duration of a `with` block; unwrapped afterwards, even on failure."""
    moe_infer.wrap(model, **fields)
    try:
        yield model
    finally:
        if moe_infer.is_wrapped(model):
            moe_infer.unwrap(model)


def expert_bytes(model: nn.Module) -> int:
    """Bytes of one expert of `model`'s first MoE layer (wraps and unwraps it to ask)."""
    moe_infer.wrap(model)
    try:
        return moe_infer.executor(model).layers[0].expert_source.expert_nbytes()
    finally:
        moe_infer.unwrap(model)
