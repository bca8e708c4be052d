"""Every environment variable moe_infer reads, in one place. They are escape hatches: configuration
proper is `MoEConfig` and data files.

- `MOE_INFER_CACHE`: where `moe_infer.load` puts checkpoints it converts on the fly
  (default `~/.cache/moe_infer`; converted checkpoints go under `converted/<fingerprint>`, and the
  remembered sha256 of source shards under `file-sha256/`).
- `MOE_INFER_KERNEL_CONFIG_DIR`: a directory of tuned fused-MoE kernel configs searched before the
  ones shipped in `moe_infer/kernels/configs/` (what `scripts/tune_fused_moe.py --out-dir` writes).
- `TRITON_INTERPRET` (Triton's own): "1" runs Triton kernels in its CPU interpreter; moe_infer then
  accepts `kernel="triton"` on a machine without CUDA (slow; for tests).
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("MOE_INFER_CACHE") or os.path.join("~", ".cache", "moe_infer"))


def kernel_config_dir() -> str | None:
    return os.environ.get("MOE_INFER_KERNEL_CONFIG_DIR") or None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
