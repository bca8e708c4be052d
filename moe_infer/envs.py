"""Environment variables moe_infer reads, all of them, in one place (escape hatches, not configuration).

- `MOE_INFER_CACHE`: where `moe_infer.load` puts checkpoints it converts on the fly
  (default `~/.cache/moe_infer`; converted checkpoints go under `converted/<fingerprint>`).
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("MOE_INFER_CACHE") or os.path.join("~", ".cache", "moe_infer"))
