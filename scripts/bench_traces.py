"""Traces of the shipped models over several kinds of text, for the batching and placement benchmarks.

Text every machine with Python has: held-out standard-library ``.py`` files (the files the shipped
models were not trained on), reStructuredText (``.rst`` under the standard library and
site-packages), license texts (``/usr/share/common-licenses`` and ``LICENSE*`` files of installed
distributions) and package metadata (``METADATA`` of installed distributions). Each kind is
profiled with `moe_infer.traces.profiler.record_trace` (what ``moe-infer profile`` runs) in prefill mode;
each window of ``seq_len`` tokens is one sequence (one request, for the batching benchmark).

    python scripts/bench_traces.py --model tiny-mixtral --out-dir out/traces
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

from moe_infer.traces.corpus import EXCLUDED_DIRS, is_heldout  # the held-out split of the shipped models

KINDS = ("py", "rst", "license", "metadata")


def text_files(per_kind: int, min_bytes: int = 3000) -> dict[str, list[Path]]:
    """Up to ``per_kind`` files of each kind, at least ``min_bytes`` long, sorted by path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    candidates: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if not EXCLUDED_DIRS & set(relative.parts[:-1]) and is_heldout(relative.as_posix()):
            candidates["py"].append(path)
    candidates["rst"] = sorted(stdlib.rglob("*.rst")) + sorted(purelib.rglob("*.rst"))
    licenses = Path("/usr/share/common-licenses")
    candidates["license"] = (sorted(p for p in licenses.iterdir() if p.is_file()) if licenses.is_dir() else []) \
        + sorted(purelib.glob("*.dist-info/LICENSE*")) + sorted(purelib.glob("*.dist-info/licenses/*"))
    candidates["metadata"] = sorted(purelib.glob("*.dist-info/METADATA"))
    chosen = {}
    for kind, paths in candidates.items():
        big = [p for p in paths if p.is_file() and p.stat().st_size >= min_bytes]
        # spread the choice over the sorted list (not only the first package alphabetically)
        step = max(len(big) // per_kind, 1)
        chosen[kind] = big[::step][:per_kind]
    return chosen


def record(model_name: str, out_dir: Path, *, per_kind: int = 12, seq_len: int = 128,
           tokens_per_kind: int = 6144) -> tuple[Path, dict[str, int]]:
    """Record (or reuse) one trace per text kind and join them; returns the joined trace's path and
    the number of sequences of each kind, in the joined order."""
    from moe_infer.models import load_model
    from moe_infer.traces.profiler import ProfileOptions, record_trace
    from moe_infer.traces.trace import Trace

    out_dir.mkdir(parents=True, exist_ok=True)
    joined = out_dir / f"{model_name}-mixed.safetensors"
    counts_file = out_dir / f"{model_name}-mixed.kinds"
    if joined.exists() and counts_file.exists():
        counts = dict((k, int(v)) for k, v in (line.split() for line in counts_file.read_text().splitlines()))
        return joined, counts
    model, tokenizer = load_model(model_name, device="cpu")
    options = ProfileOptions(mode="prefill", seq_len=seq_len, batch_size=8, max_tokens=tokens_per_kind,
                             progress=False)
    traces, counts = [], {}
    for kind, files in text_files(per_kind).items():
        if not files:
            continue
        path = out_dir / f"{model_name}-{kind}.safetensors"
        record_trace(model, path, texts=files, tokenizer=tokenizer, model_name=model_name, options=options)
        trace = Trace.load(path)
        traces.append(trace)
        counts[kind] = trace.num_sequences
    Trace.concat(traces).save(joined)
    counts_file.write_text("".join(f"{k} {v}\n" for k, v in counts.items()))
    return joined, counts


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark over these traces shares: --models, --trace-dir, --results."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    parser.add_argument("--trace-dir", default="out/traces")
    parser.add_argument("--results", default="bench/results")
    return parser


def environment(**extra) -> dict:
    import torch

    return {"device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra}


def write_results(results: str | Path, name: str, record: dict, markdown: str) -> None:
    """Append ``record`` as one JSON line to ``results/name.json`` and write ``results/name.md``."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{name}.json", "a") as file:
        file.write(json.dumps(record) + "\n")
    (results / f"{name}.md").write_text(markdown)
    print(f"wrote {results / (name + '.json')} and {results / (name + '.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-mixtral")
    parser.add_argument("--out-dir", default="out/traces")
    args = parser.parse_args()
    path, counts = record(args.model, Path(args.out_dir))
    print(f"{path}: sequences per kind {counts}")


if __name__ == "__main__":
    main()
