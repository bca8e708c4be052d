"""MoE layer kernels: token alignment and fused grouped-GEMM Triton kernels (`fused_moe`, and
`fused_moe_quantized` for int8 / int4 experts), their launch configs, the torch references of the
same contracts (`reference_moe`, `reference_moe_quantized`), and the `transformers` experts
implementation named "moe_infer" built on them (registered when this package is imported).

Triton ships with Linux builds of torch only: elsewhere `HAS_TRITON` is False and only the
references are here (`MoEConfig.kernel="triton"` is refused, "auto" runs torch).
"""

if __name__ == "moe_infer.kernels":
    from importlib.util import find_spec

    from .reference import reference_moe, reference_moe_quantized

    HAS_TRITON = find_spec("triton") is not None
    __all__ = ["HAS_TRITON", "reference_moe", "reference_moe_quantized"]
    if HAS_TRITON:
        from .align import Alignment, align_block_size
        from .config import KernelConfig, get_config
        from .fused_moe import fused_experts, fused_moe, fused_moe_quantized, triton_runs_on
        from .hf_experts import module_experts_forward, register_experts_implementation

        register_experts_implementation()
        __all__ += ["Alignment", "KernelConfig", "align_block_size", "fused_experts", "fused_moe",
                    "fused_moe_quantized", "get_config", "module_experts_forward", "register_experts_implementation",
                    "triton_runs_on"]
else:
    # Python started in the repository root finds this folder as a top-level `kernels`, the name of the
    # Hugging Face package that `transformers` imports to probe for it: stay an empty module there.
    __all__ = []
