"""A `convert` run for the kill tests of test_faults.py, in a process of its own:

    python tests/convert_worker.py SRC DST [--verify]

Prints "ready" once imported, one "progress" line each time the converter reports source bytes
done, and "done" at the end (stdout, flushed), so the test can kill it at a chosen point.
"""

from __future__ import annotations

import sys

from moe_infer.experts.convert import convert
from moe_infer.experts.skeleton import build_from_config  # noqa: F401  (import transformers before "ready")


def main() -> None:
    src, dst, *rest = sys.argv[1:]
    print("ready", flush=True)
    convert(src, dst, verify_after="--verify" in rest, progress=lambda nbytes: print("progress", flush=True))
    print("done", flush=True)


if __name__ == "__main__":
    main()
