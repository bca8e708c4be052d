#!/usr/bin/env python
"""Cost and recall of runtime prediction in decode: the shipped tiny-mixtral `expertflow` predictor
driving the prefetch of a wrapped model (the demo's "ours": half the expert bytes, expertflow cache
policy), teacher-forced one token per step over held-out text (`moe_infer.traces.corpus`).

Per prefetch depth it reports the median decode step, the wall time spent in the prediction hook
per step and its share of the decode time, and the hook's recall per distance (the true experts
found among each token's predicted top-K, measured as the model routes).

    python scripts/bench_prediction_cost.py --label after [--files 4 --tokens 96] [--out-dir bench/results]

Appends one JSON line per run to prediction_cost.jsonl and rewrites prediction_cost.md from every
line there (under the current directory unless --out-dir says otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import moe_infer
from moe_infer import demo
from moe_infer.traces import corpus
from moe_infer.helpformat import HelpFormatter
from moe_infer.models import encode_text, load_model

MODEL = "tiny-mixtral"


def heldout_sequences(tokenizer, files: int, tokens: int) -> list[list[int]]:
    """The first `tokens` token ids of each of the first `files` held-out files long enough."""
    _, paths = corpus.stdlib_files()
    out = []
    for rel, path in paths:
        if corpus.is_heldout(rel):
            ids = encode_text(tokenizer, path.read_text(encoding="utf-8", errors="replace"))
            if len(ids) >= tokens:
                out.append(ids[:tokens])
        if len(out) == files:
            break
    return out


@torch.inference_mode()
def decode_run(model, sequences: list[list[int]]) -> dict:
    """Teacher-forced decode of every sequence, one token per call after a one-token prefill."""
    executor = moe_infer.executor(model)
    hook = executor.predictor_hook
    step_seconds, hook_seconds = [], []
    for ids in sequences:
        past = None
        for n, token in enumerate(ids):
            before = hook.seconds
            start = time.perf_counter()
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            elapsed = time.perf_counter() - start
            past = out.past_key_values
            if n:  # decode steps only: the first call of a sequence has no previous token
                step_seconds.append(elapsed)
                hook_seconds.append(hook.seconds - before)
    return {"steps": len(step_seconds), "step_ms_median": 1e3 * statistics.median(step_seconds),
            "hook_ms_mean": 1e3 * statistics.fmean(hook_seconds),
            "predict_share": sum(hook_seconds) / sum(step_seconds), "recall": hook.recall()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(records: list[dict]) -> str:
    lines = ["# Runtime prediction in decode: cost and recall", "",
             "The shipped tiny-mixtral `expertflow` predictor prefetching for the wrapped model (the demo's "
             "\"ours\": half the expert bytes, `cache_policy=expertflow`, `cpu_compute=auto`), teacher-forced one "
             "token per step over held-out text. `predict %`: wall time in the prediction hook (predicting, "
             "scoring, prefetch requests) / the decode steps' wall time. Recall: true experts found among "
             "each token's predicted top-K, per distance d (MoE layers ahead).", "",
             "Command: `python scripts/bench_prediction_cost.py --label <label> --files F --tokens N`.", "",
             "| label | commit | date (UTC) | load avg | depth | steps | step ms (median) | hook ms/step | "
             "predict % | recall d=1 | d=2 | d=3 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for row in r["rows"]:
            recall = [row["recall"].get(str(d), row["recall"].get(d)) for d in (1, 2, 3)]
            shown = " | ".join("" if v is None else f"{v:.4f}" for v in recall)
            lines.append(f"| {r['label']} | {r['commit']} | {r['date'][:16].replace('T', ' ')} | "
                         f"{r['load_average'][0]:.2f} | {row['depth']} | {row['steps']} | {row['step_ms_median']:.2f} "
                         f"| {row['hook_ms_mean']:.3f} | {100 * row['predict_share']:.1f} | {shown} |")
    machine = records[-1]["machine"] if records else ""
    lines += ["", f"Machine: {machine}; torch {records[-1]['torch'] if records else ''}. `commit`: the checkout the "
              "script ran in."]
    lines += [f"- {r['label']}: {r['note']}" for r in records if r.get("note")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--label", required=True, help="name of this run's rows (e.g. the code version)")
    parser.add_argument("--files", type=int, default=4, help="held-out files, one sequence each")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per sequence")
    parser.add_argument("--depths", default="1,3", help="prefetch depths, one run each")
    parser.add_argument("--note", default="", help="what the label's code is, shown under the table")
    parser.add_argument("--out-dir", default=os.path.join("bench", "results"), help="folder of the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared; one thread keeps runs comparable
    load = os.getloadavg()
    model, tokenizer = load_model(MODEL, device="cpu", dtype="float32")
    sequences = heldout_sequences(tokenizer, args.files, args.tokens)
    moe_infer.wrap(model)
    executor = moe_infer.executor(model)
    total = sum(layer.expert_source.expert_nbytes() * layer.num_experts for layer in executor.layers)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        moe_infer.wrap(model, cpu_memory=int(total * demo.BUDGET_FRACTION), **demo.OURS,
                       predictor=str(demo.predictor_beside(MODEL)), prefetch_depth=depth)
        decode_run(model, sequences[:1])  # warm-up: threads started, first loads
        executor.reset_stats()
        rows.append({"depth": depth, **decode_run(model, sequences)})
        print(rows[-1], flush=True)
    moe_infer.unwrap(model)
    record = {"benchmark": "prediction_cost", "label": args.label, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs shared, {platform.machine()}, 1 torch thread",
              "load_average": load, "torch": torch.__version__, "files": args.files, "tokens": args.tokens,
              "note": args.note,
              "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "prediction_cost.jsonl")
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
    with open(path) as file:
        records = [json.loads(line) for line in file if line.strip()]
    text = markdown(records)
    with open(os.path.join(args.out_dir, "prediction_cost.md"), "w") as file:
        file.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
