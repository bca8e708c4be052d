"""MoE layer kernels: token alignment and fused grouped-GEMM Triton kernels (`fused_moe`), their launch
configs, the torch reference of the same contract (`reference_moe`), and the `transformers` experts
implementation named "moe_infer" built on them (registered when this package is imported).

Triton ships with Linux builds of torch only: elsewhere `HAS_TRITON` is False and only
`reference_moe` is here (`MoEConfig.kernel="triton"` is refused, "auto" runs torch).
"""

if __name__ == "moe_infer.kernels":
    from importlib.util import find_spec

    from .reference import reference_moe

    HAS_TRITON = find_spec("triton") is not None
    __all__ = ["HAS_TRITON", "reference_moe"]
    if HAS_TRITON:
        from .align import Alignment, align_block_size
        from .config import KernelConfig, get_config
        from .fused_moe import fused_experts, fused_moe, triton_runs_on
        from .hf_experts import module_experts_forward, register_experts_implementation

        register_experts_implementation()
        __all__ += ["Alignment", "KernelConfig", "align_block_size", "fused_experts", "fused_moe", "get_config",
                    "module_experts_forward", "register_experts_implementation", "triton_runs_on"]
else:
    # Python started in the repository root finds this folder as a top-level `kernels`, the name of the
    # Hugging Face package that `transformers` imports to probe for it: stay an empty module there.
    __all__ = []
