"""MoE layer kernels: token alignment and fused grouped-GEMM Triton kernels (`fused_moe`), their launch
configs, the torch reference of the same contract (`reference_moe`), and the `transformers` experts
implementation named "moe_infer" built on them."""

from .align import Alignment, align_block_size
from .config import KernelConfig, get_config
from .fused_moe import fused_experts, fused_moe, triton_runs_on
from .reference import reference_moe

__all__ = ["Alignment", "KernelConfig", "align_block_size", "fused_experts", "fused_moe", "get_config",
           "reference_moe", "triton_runs_on"]
