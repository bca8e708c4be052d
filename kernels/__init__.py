"""MoE layer kernels: the torch reference of the `fused_moe` contract."""

from .reference import reference_moe

__all__ = ["reference_moe"]
