"""Model-family adapters for `wrap`: find sparse MoE blocks by structure, and describe each one.

A sparse MoE block is a module with a child named `experts` next to a router child (`gate` or
`router`); its family is recognised by the router's class, whose routing convention picks a
`moe_infer.routing` adapter. The block's other children must be shared experts in one of the
known arrangements, or the block is refused: a block we do not fully understand is never wrapped,
because wrapping must not change a model's outputs.

Owns: the table of supported router classes, the shared-expert arrangements, the per-family
router call (used to verify an adapter against the real router). Does not own the execution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from moe_infer.errors import UnsupportedModel
from moe_infer.routing.adapters import (
    BiasedSoftmaxRouter,
    DeepSeekV2Router,
    RouterAdapter,
    SigmoidBiasRouter,
    SoftmaxTopK,
    SparseMixerRouter,
    TopKSoftmax,
)

# block-level tensor lookup: name -> tensor, on whatever module currently holds the block's state
BlockAttr = Callable[[str], object]


@dataclass(frozen=True)
class FamilySpec:
    family: str  # what users call it
    router_classes: tuple[str, ...]
    build_adapter: Callable[[nn.Module, BlockAttr, int], RouterAdapter]
    # extra positional arguments the family's router forward takes (names of block attributes)
    router_args: Callable[[BlockAttr], tuple] = lambda block: ()
    returns_router_scores: bool = False  # GPT-OSS blocks return (out, router_scores)
    examples: tuple[str, ...] = field(default=())


def _softmax_topk(renormalize, cast):
    def build(router, block, num_experts):
        norm = renormalize if isinstance(renormalize, bool) else bool(getattr(router, renormalize))
        return SoftmaxTopK(router, num_experts, router.top_k, renormalize=norm, cast_to_logits_dtype=cast,
                           weight=lambda: router.weight)
    return build


def _hunyuan(router, block, num_experts):
    return SoftmaxTopK(router, num_experts, router.top_k, renormalize=True, cast_to_logits_dtype=True,
                       weight=lambda: router.wg.weight, fp32_input_if_fp32_weight=True)


def _gpt_oss(router, block, num_experts):
    return TopKSoftmax(router, num_experts, router.top_k, weight=lambda: router.weight, bias=lambda: router.bias,
                       fp32_logits=False)


def _granite(router, block, num_experts):
    return TopKSoftmax(router, num_experts, router.top_k, weight=lambda: router.weight, fp32_logits=True)


def _deepseek_v2(router, block, num_experts):
    return DeepSeekV2Router(router, num_experts, router.top_k, weight=lambda: router.weight,
                            method=router.topk_method, num_groups=router.num_group or 1,
                            topk_group=router.topk_group or 1, scaling=float(router.routed_scaling_factor))


def _deepseek_v3(router, block, num_experts):
    return SigmoidBiasRouter(router, num_experts, router.top_k, weight=lambda: router.weight,
                             bias=lambda: router.e_score_correction_bias, logits_mode="fp32", grouped=True,
                             num_groups=router.num_group, topk_group=router.topk_group,
                             renormalize=bool(router.norm_topk_prob), norm_eps=1e-20,
                             scaling=float(router.routed_scaling_factor), sorted_topk=False)


def _minimax_m2(router, block, num_experts):
    return SigmoidBiasRouter(router, num_experts, router.top_k, weight=lambda: router.weight,
                             bias=lambda: block("e_score_correction_bias"), logits_mode="weight_dtype_then_fp32",
                             grouped=False, renormalize=True, norm_eps=0.0, scaling=1.0, sorted_topk=False)


def _lfm2(router, block, num_experts):
    use_bias = bool(router.use_expert_bias)
    return SigmoidBiasRouter(router, num_experts, router.top_k, weight=lambda: router.weight,
                             bias=(lambda: block("expert_bias")) if use_bias else (lambda: None),
                             logits_mode="native", grouped=False, renormalize=bool(router.norm_topk_prob),
                             norm_eps=1e-6, scaling=float(router.routed_scaling_factor), sorted_topk=True,
                             gather_as_logits_dtype=True)


def _ernie(router, block, num_experts):
    statics = router.moe_statics
    return BiasedSoftmaxRouter(router, num_experts, router.top_k, weight=lambda: router.weight,
                               bias=lambda: statics.e_score_correction_bias.squeeze(), norm_min=float(router.norm_min))


def _phimoe(router, block, num_experts):
    return SparseMixerRouter(router, num_experts, router.top_k, weight=lambda: router.weight,
                             bias=lambda: router.bias, jitter_eps=float(router.router_jitter_noise))


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("mixtral", ("MixtralTopKRouter", "MiniMaxTopKRouter"), _softmax_topk(True, False),
               examples=("Mixtral", "MiniMax")),
    FamilySpec("qwen-moe", ("Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "Qwen3NextTopKRouter", "OlmoeTopKRouter",
                            "FlexOlmoTopKRouter"),
               _softmax_topk("norm_topk_prob", True),
               examples=("Qwen2-MoE", "Qwen3-MoE", "Qwen3-Next", "OLMoE", "FlexOlmo")),
    FamilySpec("jamba", ("JambaTopKRouter",), _softmax_topk(False, True), examples=("Jamba",)),
    FamilySpec("hunyuan", ("HunYuanMoEV1Gate",), _hunyuan, examples=("HunYuan-V1-MoE",)),
    FamilySpec("gpt-oss", ("GptOssTopKRouter",), _gpt_oss, returns_router_scores=True, examples=("GPT-OSS",)),
    FamilySpec("granite", ("GraniteMoeTopKRouter", "GraniteMoeSharedTopKRouter", "GraniteMoeHybridTopKRouter"),
               _granite, examples=("GraniteMoE", "GraniteMoeShared", "GraniteMoeHybrid")),
    FamilySpec("deepseek-v2", ("DeepseekV2TopkRouter",), _deepseek_v2, examples=("DeepSeek-V2",)),
    FamilySpec("deepseek-v3", ("DeepseekV3TopkRouter", "DeepseekV32TopkRouter", "Glm4MoeTopkRouter",
                               "Glm4MoeLiteTopkRouter", "Dots1TopkRouter", "ExaoneMoeTopkRouter"),
               _deepseek_v3, examples=("DeepSeek-V3", "DeepSeek-V3.2", "GLM4-MoE", "GLM4-MoE-Lite", "dots1",
                                       "EXAONE-MoE")),
    FamilySpec("minimax-m2", ("MiniMaxM2TopKRouter",), _minimax_m2,
               router_args=lambda block: (block("e_score_correction_bias"),), examples=("MiniMax-M2",)),
    FamilySpec("lfm2-moe", ("Lfm2MoeTopKRouter",), _lfm2,
               router_args=lambda block: (block("expert_bias") if block("use_expert_bias") else None,),
               examples=("LFM2-MoE",)),
    FamilySpec("ernie4.5-moe", ("Ernie4_5_MoeTopKRouter",), _ernie, examples=("Ernie 4.5 MoE",)),
    FamilySpec("phimoe", ("PhimoeTopKRouter",), _phimoe, examples=("PhiMoE",)),
)

_BY_ROUTER_CLASS = {name: spec for spec in FAMILIES for name in spec.router_classes}


def supported_families() -> list[str]:
    return [example for spec in FAMILIES for example in spec.examples]


# Shared experts: the block's children besides the router and `experts`, and how they combine.
def _gated_shared(block: nn.Module, hidden: Tensor) -> Tensor:  # Qwen2-MoE, Qwen3-Next
    return torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


SHARED_ARRANGEMENTS: dict[frozenset, Callable[[nn.Module, Tensor], Tensor] | None] = {
    frozenset(): None,
    frozenset({"shared_expert", "shared_expert_gate"}): _gated_shared,
    frozenset({"shared_experts"}): lambda block, hidden: block.shared_experts(hidden),  # DeepSeek, GLM, Ernie
    frozenset({"shared_mlp"}): lambda block, hidden: block.shared_mlp(hidden),  # HunYuan
}


@dataclass
class FoundBlock:
    name: str  # qualified module name, e.g. "model.layers.3.mlp"
    module: nn.Module
    layer_idx: int
    router_attr: str
    spec: FamilySpec
    shared: Callable[[nn.Module, Tensor], Tensor] | None


def _is_candidate(module: nn.Module) -> bool:
    children = dict(module.named_children())
    if "experts" in children:
        return True
    # MoE blocks that keep their experts under another name (DBRX `ffn`, JetMoE): refuse them loudly
    cls = type(module).__name__.lower()
    return ("moe" in cls or "sparse" in cls) and ("router" in children or "gate" in children)


def _layer_index(name: str) -> int:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else 0


def _describe_supported() -> str:
    return ", ".join(supported_families())


def find_moe_blocks(model: nn.Module) -> list[FoundBlock]:
    """Every sparse MoE block of `model`, in module order. Raises `UnsupportedModel` when there is
    none, or when any MoE-looking block is not one of the supported families."""
    found: list[FoundBlock] = []
    for name, module in model.named_modules():
        if any(name.startswith(block.name + ".") for block in found) or not _is_candidate(module):
            continue
        children = dict(module.named_children())
        block_cls = type(module).__name__
        router_attr = "gate" if "gate" in children else "router" if "router" in children else None
        router = children.get(router_attr) if router_attr else None
        spec = _BY_ROUTER_CLASS.get(type(router).__name__) if router is not None else None
        if spec is None or "experts" not in children:
            what = f"router {type(router).__name__}" if router is not None else "no `gate`/`router` child"
            raise UnsupportedModel(
                f"{type(model).__name__}: MoE block {block_cls} at '{name}' ({what}) is not supported; "
                f"moe_infer supports {_describe_supported()}"
            )
        others = frozenset(children) - {router_attr, "experts"}
        if others not in SHARED_ARRANGEMENTS:
            raise UnsupportedModel(
                f"{type(model).__name__}: MoE block {block_cls} at '{name}' has children {sorted(others)} besides "
                f"its router and experts, which is not a known shared-expert arrangement; moe_infer supports "
                f"{_describe_supported()}"
            )
        found.append(FoundBlock(name, module, _layer_index(name), router_attr, spec, SHARED_ARRANGEMENTS[others]))
    if not found:
        raise UnsupportedModel(
            f"{type(model).__name__} has no sparse MoE block (a module with `experts` and a `gate`/`router`); "
            f"moe_infer wraps Mixture-of-Experts models: {_describe_supported()}"
        )
    return found
