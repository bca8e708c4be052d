#!/usr/bin/env python
"""Recall of every routing predictor on the shipped tiny models.

For each model: record four traces with ``moe_infer.traces.profiler.record_trace`` (every MoE input and
the token embedding as features) -- training text (every 2nd training-split stdlib file),
validation text (the other training-split files: never trained on, never reported as a result),
held-out text (the held-out stdlib files, split by ``moe_infer.traces.corpus``'s rule, which the models
never saw) and text of another kind (license texts from /usr/share/common-licenses).

With ``--tune``, the learned predictors' hyperparameters (``TUNING``: expertflow's and pregate's
hidden size and loss) are searched first: every
combination is trained on the training trace and scored on the validation trace only (mean
recall over d=1..4), each finished row written to ``predictors-tune.{json,md}``; the best
combination of each row below is then used. Without ``--tune`` the library defaults are used.

Then every predictor is trained on the training trace and its recall of the true experts among
the predicted top-K at layer distances 1..4 is reported on validation, held-out and license text,
with calibration and cost per token (multiply-accumulates and measured time) beside the model's
own; the shipped ``predictor-expertflow.safetensors`` is scored the same way. Then, with room for
half of each layer's experts: hit rates in the trace-driven cache simulator (LRU, belady, and
prefetch driven by each predictor), and in the executor on CPU tiers (greedy decoding of
held-out prompts: bytes moved, time stalled, prefetches, outputs compared with the unbudgeted
model). ``predictors.json`` and ``predictors.md`` are rewritten after every finished row.

    moe-infer bench predictors --tune               # both models, tuning included
    moe-infer bench predictors --models tiny-mixtral --epochs 2

(``python scripts/bench_predictors.py ...`` is the same.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import moe_infer
import moe_infer.assets
from moe_infer.helpformat import HelpFormatter
from moe_infer.traces.corpus import is_heldout, stdlib_files  # the split rule of the shipped models
from moe_infer.predictors import train
from moe_infer.traces.profiler import record_trace
from moe_infer.traces.trace import Trace

RESULTS = Path("bench") / "results"  # under the current directory
LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1"]
LICENSE_DIR = Path("/usr/share/common-licenses")
# (row name, kind, options); learned predictors also get --epochs. "expertflow" and "pregate" rows
# take the tuned options of their tuning group (``TUNING``) over these.
PREDICTORS = [
    ("frequency", "frequency", {}),
    ("markov", "markov", {}),
    ("gate-lookahead", "gate-lookahead", {}),
    ("expertflow", "expertflow", {}),
    # the next layer's attention run ahead on the residual stream (predictors/lookahead.py): more
    # recall at d=1 for one extra attention pass per MoE layer
    ("expertflow (attention lookahead)", "expertflow", {"attention_lookahead": True}),
    # ablation of the chosen options: no previous-token MoE inputs
    ("expertflow (previous_dim=0)", "expertflow", {"previous_dim": 0}),
    ("pregate", "pregate", {}),
    ("pregate (next token)", "pregate", {"lookahead": 1}),
]
SHIPPED_ROW = "expertflow, shipped file"  # moe_infer.assets.predictor_path(model): trained once, not here
# --tune: (tuning group, kind, fixed options, grid). A row of PREDICTORS takes the best combination
# of its group (ROW_GROUP) under its own options; the attention-lookahead row shares expertflow's
# choice (searching it apart would double the search, the costliest part of this benchmark).
TUNING = [
    ("expertflow", "expertflow", {"attention_lookahead": False},
     {"hidden": [80, 192], "loss": ["membership", "distillation"]}),
    ("pregate", "pregate", {"lookahead": 0}, {"hidden": [48, 96], "loss": ["membership", "distillation"]}),
]
ROW_GROUP = {"expertflow": "expertflow", "expertflow (previous_dim=0)": "expertflow",
             "expertflow (attention lookahead)": "expertflow", "pregate": "pregate", "pregate (next token)": "pregate"}
LEARNED = {"expertflow", "pregate"}
DISTANCES = (1, 2, 3, 4)
# simulator rows: (row name, policy, predictor row or None)
SIMULATIONS = [("lru", "lru", None), ("belady (no prefetch)", "belady", None)] + [
    (f"{policy} + {row}", policy, row)
    for row in ("markov", "gate-lookahead", "expertflow", "expertflow (attention lookahead)", "pregate")
    for policy in ("lru", "expertflow")]
# executor rows: (row name, cache policy, predictor row or None)
EXECUTIONS = [("lru", "lru", None), ("lru + gate-lookahead", "lru", "gate-lookahead"),
              ("expertflow + gate-lookahead", "expertflow", "gate-lookahead"),
              ("expertflow + expertflow", "expertflow", "expertflow"),
              ("expertflow + expertflow (attention lookahead)", "expertflow", "expertflow (attention lookahead)"),
              ("expertflow + pregate", "expertflow", "pregate")]


TRAIN_EVERY = 2  # the training trace reads every TRAIN_EVERY-th training-split file


def ordinal(n: int) -> str:
    return f"{n}{'st' if n == 1 else 'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def corpora() -> dict[str, list[Path]]:
    """Files of each trace: "train" (every TRAIN_EVERY-th training-split file), "validation" (the
    training-split files in between: for choosing hyperparameters), "heldout" (the held-out split:
    the reported result), "licenses" (another kind of text), when present."""
    _, files = stdlib_files()
    training = [path for rel, path in files if not is_heldout(rel)]
    validation = [path for i, path in enumerate(training) if i % TRAIN_EVERY]
    corpora = {"train": training[::TRAIN_EVERY], "validation": validation,
               "heldout": [path for rel, path in files if is_heldout(rel)]}
    licenses = [LICENSE_DIR / name for name in LICENSES if (LICENSE_DIR / name).is_file()]
    if licenses:
        corpora["licenses"] = licenses
    return corpora


def record(model_name: str, model, name: str, files: list[Path], work_dir: Path, max_tokens: int) -> Trace:
    path = work_dir / f"{model_name}-{name}.safetensors"
    if not path.exists():
        layers = moe_infer.executor(model).moe_layer_indices
        features = ("embedding", *(f"moe_input:{layer}" for layer in layers))
        record_trace(model, path, texts=files, seq_len=512, batch_size=8, max_tokens=max_tokens,
                     features=features, model_name=model_name, progress=True)
    return Trace.load(path)


def model_cost(model, trace: Trace) -> dict:
    """Parameter multiply-accumulates per token (non-embedding weights, routed experts at K/E) and
    measured seconds per token of a prefill over the trace's first sequences."""
    num_experts, top_k = trace.num_experts, trace.top_k
    macs = 0.0
    for name, param in model.named_parameters():
        if "embed_tokens" in name or param.ndim < 2:
            continue
        share = top_k / num_experts if ".experts." in name and "shared" not in name else 1.0
        macs += param.numel() * share
    sequences = [span for _, span in trace.sequences()][:8]
    ids = [trace.token_ids[span].long() for span in sequences]
    width = min(len(i) for i in ids)
    batch = torch.stack([i[:width] for i in ids])
    with torch.inference_mode():
        model(batch, use_cache=False)  # warm-up
        start = time.perf_counter()
        model(batch, use_cache=False)
        seconds = time.perf_counter() - start
    return {"macs_per_token": int(macs), "seconds_per_token": seconds / batch.numel()}


# Mixtral-8x7B: per layer q/o 4096x4096, k/v 4096x1024, 2 of 8 experts of 3 x 4096 x 14336; LM head 4096 x 32000
MIXTRAL_SHAPE = {"num_layers": 32, "num_experts": 8, "hidden_size": 4096, "vocab_size": 32000}
MIXTRAL_MACS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 3 * 4096 * 14336 + 4096 * 8) + 4096 * 32000
# attention lookahead at that shape: the next layer's attention projections and router, for 31 of 32 layers
MIXTRAL_LOOKAHEAD_MACS = 31 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8)


def cost_at_mixtral_shape(predictor) -> dict | None:
    """MACs per token of ``predictor``'s architecture (its options) built for Mixtral-8x7B's routing
    shape, and their share of that model's; None for predictors without a network."""
    if not hasattr(predictor, "build_net"):
        return None
    options = {**predictor.options, "vocab_size": MIXTRAL_SHAPE["vocab_size"],
               "hidden_size": MIXTRAL_SHAPE["hidden_size"]}
    if options.get("attention_lookahead"):
        options["lookahead_macs"] = MIXTRAL_LOOKAHEAD_MACS
    with torch.device("meta"):
        net = type(predictor).build_net(MIXTRAL_SHAPE["num_layers"], MIXTRAL_SHAPE["num_experts"], options)
    macs = type(predictor)(predictor.signature, net, options).macs_per_token()
    return {"macs_per_token": int(macs), "share": macs / MIXTRAL_MACS}


def learned_options(kind: str, options: dict, args) -> dict:
    options = dict(options)
    if kind in LEARNED:
        options.update(epochs=args.epochs, max_seconds=args.max_seconds)
    return options


def evaluate(predictor, traces: dict[str, Trace], names) -> dict:
    out = {}
    for name in names:
        evaluation = predictor.evaluate(traces[name], max_distance=max(DISTANCES))
        out[name] = {key: evaluation[key] for key in ("recall", "recall_per_layer", "calibration", "seconds_per_token")}
    return out


def validation_score(entry: dict) -> float:
    """What tuning maximises: mean validation recall over d = 1..4."""
    recall = entry["eval"]["validation"]["recall"]
    return sum(recall[d] for d in DISTANCES) / len(DISTANCES)


def tune(model_name: str, traces: dict[str, Trace], args, report) -> dict[str, dict]:
    """Every combination of ``TUNING``'s grids, trained on "train" and scored on "validation" only;
    returns the best options of each tuning group. ``report(group, row)`` gets each finished row."""
    import itertools

    from tqdm.auto import tqdm

    from moe_infer.predictors.progress import training_progress

    combinations = [(group, kind, {**fixed, **dict(zip(grid, values))})
                    for group, kind, fixed, grid in TUNING for values in itertools.product(*grid.values())]
    best: dict[str, tuple[float, dict]] = {}
    with tqdm(total=len(combinations), desc=f"{model_name} tuning", unit="run") as progress:
        for group, kind, options in combinations:
            start = time.perf_counter()
            with training_progress(f"{model_name} {group} {options}"):
                predictor = train(kind, traces["train"], **learned_options(kind, options, args))
            row = {"group": group, "kind": kind, "options": options, "train_seconds": time.perf_counter() - start,
                   "macs_per_token": predictor.cost()["macs_per_token"],
                   "eval": evaluate(predictor, traces, ["validation"])}
            row["score"] = validation_score(row)
            # ties keep the first (smaller) combination of the grid
            if group not in best or row["score"] > best[group][0]:
                best[group] = (row["score"], options)
            report(group, row)
            progress.update(1)
    return {group: options for group, (_, options) in best.items()}


def run_model(model_name: str, args, report) -> dict:
    """Every measurement of one model; ``report(result)`` gets the partial result after each row."""
    from tqdm.auto import tqdm

    from moe_infer.predictors import load as load_predictor
    from moe_infer.predictors.progress import training_progress

    model, _ = moe_infer.assets.load_model(model_name)
    moe_infer.wrap(model)
    traces = {name: record(model_name, model, name, files, args.work_dir,
                           args.train_tokens if name == "train" else args.eval_tokens)
              for name, files in corpora().items()}
    result = {"model": model_name, "traces": {}, "predictors": {}, "tuned": None,
              "model_cost": model_cost(model, traces["heldout"])}
    for name, trace in traces.items():
        result["traces"][name] = {"tokens": trace.num_tokens, "sequences": trace.num_sequences,
                                  "files": json.loads(trace.source).get("files", [])[:3] + ["..."]}
    if args.tune:
        result["tuning"] = []

        def tuning_row(group, row):
            result["tuning"].append(row)
            report(result)

        result["tuned"] = tune(model_name, traces, args, tuning_row)
    evaluated = [name for name in traces if name != "train"]
    predictors = {}
    shipped = moe_infer.assets.predictor_path(model_name)
    rows = [*PREDICTORS, *([(SHIPPED_ROW, "expertflow", {})] if shipped is not None else [])]
    for row, kind, options in tqdm(rows, desc=f"{model_name} predictors", unit="predictor"):
        options = {**(result["tuned"] or {}).get(ROW_GROUP.get(row), {}), **options}
        options = learned_options(kind, options, args)
        if kind == "gate-lookahead":
            options["model"] = model
        start = time.perf_counter()
        if row == SHIPPED_ROW:
            predictor = load_predictor(shipped)
        else:
            with training_progress(f"{model_name} {row}"):
                predictor = train(kind, traces["train"], **options)
        seconds = time.perf_counter() - start
        entry = {"kind": kind, "options": {k: v for k, v in predictor.options.items() if k != "model"},
                 "training": predictor.training, "train_seconds": None if row == SHIPPED_ROW else seconds,
                 "cost": predictor.cost(), "cost_at_mixtral_shape": cost_at_mixtral_shape(predictor),
                 "eval": evaluate(predictor, traces, evaluated)}
        if row == SHIPPED_ROW:
            entry["file"] = f"moe_infer/assets/{model_name}/{shipped.name}"
        result["predictors"][row] = entry
        predictors[row] = predictor
        report(result)
        tqdm.write(f"{model_name} {row}: " + ", ".join(
            f"{name} " + " ".join(f"{entry['eval'][name]['recall'][d]:.3f}" for d in DISTANCES)
            for name in entry["eval"]) + f" ({seconds:.0f} s)")
    moe_infer.unwrap(model)
    result["simulator"] = simulations(traces, predictors, args)
    report(result)
    def executor_row(partial: dict) -> None:
        result["executor"] = partial
        report(result)

    result["executor"] = executions(model, traces["heldout"], predictors, args, executor_row)
    report(result)
    return result


def simulations(traces: dict[str, Trace], predictors: dict, args) -> dict:
    """Hit rates in the cache simulator with half of each layer's experts, prefetch depth 1."""
    from moe_infer.cache.simulate import simulate

    out = {}
    for name, trace in traces.items():
        if name in ("train", "validation"):
            continue
        trace = trace.select_sequences([seq for seq, _ in trace.sequences()][:args.sim_sequences])
        capacity = trace.num_experts // 2
        out[name] = {"tokens": trace.num_tokens, "capacity": capacity, "hit_rate": {}, "runs": {}}
        for row, policy, predictor in SIMULATIONS:
            sim = simulate(trace, policy, capacity, predictor=predictors.get(predictor), prefetch_depth=1)
            out[name]["hit_rate"][row] = sim.hit_rate
            out[name]["runs"][row] = sim.as_dict()
        print(f"simulator {name}: " + ", ".join(f"{row} {rate:.3f}" for row, rate in out[name]["hit_rate"].items()),
              flush=True)
    return out


def executions(model, trace: Trace, predictors: dict, args, report=lambda out: None) -> dict:
    """Greedy decoding of held-out prompts under a CPU-tier budget of half of the experts."""
    import tempfile

    spans = [span for _, span in trace.sequences()][:args.prompts]
    prompts = [trace.token_ids[span][:args.prompt_tokens].long()[None] for span in spans]
    with torch.inference_mode():
        references = [model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False) for ids in prompts]
    moe_infer.wrap(model)
    ex = moe_infer.executor(model)
    budget = sum(layer.expert_source.expert_nbytes() * layer.num_experts for layer in ex.layers) // 2
    moe_infer.unwrap(model)
    out = {"budget_bytes": budget, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "rows": {}}
    with tempfile.TemporaryDirectory() as directory:
        for row, policy, predictor_row in EXECUTIONS:
            predictor = None
            if predictor_row == "gate-lookahead":
                predictor = "gate-lookahead"
            elif predictor_row is not None:
                predictor = f"{directory}/{predictor_row}.safetensors"
                predictors[predictor_row].save(predictor)
            moe_infer.wrap(model, cpu_memory=budget, cache_policy=policy, predictor=predictor, prefetch_depth=1)
            same = True
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    for ids, reference in zip(prompts, references):
                        generated = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
                        same = same and torch.equal(generated, reference)
                stats = moe_infer.executor(model).stats()
            finally:
                moe_infer.unwrap(model)
            tier = stats["tiers"]["cpu"]
            out["rows"][row] = {"outputs_equal": same, "seconds": time.perf_counter() - start,
                                "hit_rate": tier["hits"] / max(tier["hits"] + tier["misses"], 1),
                                "bytes_moved": tier["bytes_moved"], "stall_seconds": stats["stall_seconds"],
                                "prefetch": stats["prefetch"], "predictor_recall": stats["predictor_recall"]}
            print(f"executor {row}: {out['rows'][row]}", flush=True)
            report(out)
    return out


def page_header(title: str, results: dict) -> list[str]:
    """A result page's title and the line naming the date, machine and command."""
    return [title, "", f"{results['date']}, {results['device']}, torch {results['torch']}, 1 thread. "
                       f"Command: `{results['command']}`.", ""]


def markdown(results: dict) -> str:
    lines = [*page_header("# Routing predictors: recall on held-out text and on text of another kind", results),
             "Recall = mean fraction of a token's K true experts found among the predictor's top-K at that "
             "layer, predicted from what is known d MoE layers earlier (for layers below d: from what is "
             "known before the first MoE layer); averaged over every MoE layer. Traces: prefill over "
             f"512-token windows. Training: every {ordinal(TRAIN_EVERY)} training-split stdlib file; held-out: "
             "the held-out "
             "stdlib files (`int(sha256(relpath)[:8],16) % 100 < 5`, the split the models were trained "
             "with); validation: the training-split files between the training ones (never trained on; "
             + ("hyperparameters were chosen on it alone, `predictors-tune.md`" if results["args"].get("tune")
                else "not used for any choice in this run: library defaults") + "); "
             "other text: license texts (" + ", ".join(LICENSES) + "). Learned predictors keep "
             "their top-K within the router's group limit when the training trace shows one "
             "(tiny-deepseek: 2 of 4 blocks of 8 experts; `features.group_limit`).", ""]
    for model in results["models"]:
        cost = model["model_cost"]
        lines += [f"## {model['model']}", "",
                  "Traces: " + ", ".join(f"{name} {t['tokens']} tokens" for name, t in model["traces"].items())
                  + f". Model: {cost['macs_per_token']:,} parameter MACs per token, "
                  f"{cost['seconds_per_token'] * 1e6:.1f} us per token (prefill, this machine).", ""]
        names = [name for name in model["traces"] if name != "train"]
        header = "| predictor | " + " | ".join(f"{name} d={d}" for name in names for d in DISTANCES)
        if model.get("tuned"):
            lines += ["Tuned on validation (`predictors-tune.md`): " + "; ".join(
                f"{group}: " + ", ".join(f"{k}={v}" for k, v in options.items())
                for group, options in model["tuned"].items()) + ".", ""]
        lines += [header + " | ECE d=1 (held-out) | MACs/token | % of model | % at Mixtral-8x7B shape "
                  "| us/token offline |", "|---" * (1 + len(names) * len(DISTANCES) + 5) + "|"]
        best = {(name, d): max((p["eval"][name]["recall"][d] for p in model["predictors"].values()), default=None)
                for name in names for d in DISTANCES}
        for row, entry in model["predictors"].items():
            cells = []
            for name in names:
                for d in DISTANCES:
                    value = entry["eval"][name]["recall"][d]
                    cells.append(f"**{value:.3f}**" if value == best[(name, d)] else f"{value:.3f}")
            macs = entry["cost"]["macs_per_token"]
            held = entry["eval"]["heldout"]
            at_scale = entry.get("cost_at_mixtral_shape")
            at_scale = f"{100 * at_scale['share']:.3f}" if at_scale else "-"
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {held['calibration'][1]['ece']:.3f} | {macs:,} | "
                         f"{100 * macs / cost['macs_per_token']:.1f} | {at_scale} | "
                         f"{held['seconds_per_token'] * 1e6:.1f} |")
        lines += ["", "% at Mixtral-8x7B shape: MACs per token of the same predictor (same options) built for "
                  "Mixtral-8x7B's routing shape (32 MoE layers, 8 experts, hidden size 4096, vocabulary 32000) "
                  f"over that model's {MIXTRAL_MACS / 1e9:.1f} G parameter MACs per token (attention, 2 of 8 "
                  "experts, LM head). The tiny models are themselves so small that the predictors' share of "
                  "them is large; at a real model's size the networks are a fraction of a percent. The "
                  "attention-lookahead row also counts, per MoE layer but the last, the next layer's attention "
                  "projections, this layer's shared experts and the next router, run once more per token "
                  "(`moe_infer/predictors/lookahead.py`; attention scores, which grow with the context, are not "
                  "counted).", ""]
        lines += ["Per layer, held-out, d=1 and d=4 (layer 0 first):", ""]
        for row, entry in model["predictors"].items():
            per_layer = entry["eval"]["heldout"]["recall_per_layer"]
            lines.append(f"- {row}: d=1 " + " ".join(f"{v:.2f}" for v in per_layer[1])
                         + "; d=4 " + " ".join(f"{v:.2f}" for v in per_layer[4]))
        lines.append("")
        if "simulator" in model:
            lines += simulator_markdown(model), ""
        if model.get("executor", {}).get("rows"):
            lines += executor_markdown(model), ""
    return "\n".join(lines)


def tuning_markdown(results: dict) -> str:
    """The tuning runs of ``--tune``: every combination's validation recall; the chosen ones in bold."""
    lines = [*page_header("# Routing predictors: hyperparameter search on validation text", results),
             "Each combination was trained on the training trace and scored on the validation trace only "
             "(training-split stdlib files between the training ones; never trained on, and distinct from the "
             "held-out files that `predictors.md` reports). Score: mean recall over d = 1..4; the best "
             "combination of each group (bold; ties keep the smaller network) is what `predictors.md` "
             "trains. Searched: " + "; ".join(
                 f"{group}: " + " x ".join(f"{k} in {v}" for k, v in grid.items())
                 + (" (" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")" if fixed else "")
                 for group, _, fixed, grid in TUNING) + f"; {results['args']['epochs']} epochs, "
             f"{results['args']['train_tokens']:,} training tokens.", ""]
    for model in results["models"]:
        rows = model.get("tuning", [])
        lines += [f"## {model['model']}", "",
                  "| group | options | validation d=1 | d=2 | d=3 | d=4 | score | MACs/token | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            recall = row["eval"]["validation"]["recall"]
            chosen = (model.get("tuned") or {}).get(row["group"]) == row["options"]
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
            score = f"**{row['score']:.3f}**" if chosen else f"{row['score']:.3f}"
            lines.append(f"| {row['group']} | {options} | " + " | ".join(f"{recall[d]:.3f}" for d in DISTANCES)
                         + f" | {score} | {row['macs_per_token']:,} | {row['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def simulator_markdown(model: dict) -> str:
    sims = model["simulator"]
    names = list(sims)
    first = sims[names[0]]
    lines = [f"### {model['model']}: cache simulator, {first['capacity']} of {2 * first['capacity']} experts per "
             "layer, prefetch depth 1", "",
             "Hit rate = share of (token, layer, expert) accesses found resident. `lru + P`: LRU cache, "
             "predictions of P prefetched one MoE layer ahead (for layer 0: before the token's first layer); "
             "`expertflow + P`: the cache's `expertflow` policy (evicts what P predicts least) with the same "
             "prefetch. Belady here is demand-only (it evicts optimally but never loads ahead), so "
             "prefetching policies can pass it. Tokens: " + ", ".join(f"{n} {sims[n]['tokens']}" for n in names) + ".",
             "", "| policy | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for row in first["hit_rate"]:
        lines.append(f"| {row} | " + " | ".join(f"{sims[n]['hit_rate'][row]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def executor_markdown(model: dict) -> str:
    run = model["executor"]
    lines = [f"### {model['model']}: executor on CPU tiers, budget {run['budget_bytes']:,} bytes (half of the experts)",
             "", f"Greedy decoding of {run['prompts']} held-out prompts ({run['prompt_tokens']} tokens, "
             f"{run['new_tokens']} new tokens each), batch 1, prefetch depth 1. Outputs compared with the "
             "unbudgeted model. On CPU, 'bytes moved' are copies from the backing weights into the cache tier "
             "and stalls are waits for background loads.", "",
             "| cache policy + predictor | outputs equal | hit rate | bytes moved | stall s | prefetch issued / used / "
             "wasted | runtime recall d=1 | wall s |", "|---" * 8 + "|"]
    for row, r in run["rows"].items():
        recall = r["predictor_recall"]
        recall = f"{recall.get(1, recall.get('1')):.3f}" if recall else "-"
        p = r["prefetch"]
        lines.append(f"| {row} | {r['outputs_equal']} | {r['hit_rate']:.3f} | {r['bytes_moved']:,} | "
                     f"{r['stall_seconds']:.3f} | {p['issued']} / {p['used']} / {p['wasted']} | {recall} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/moe_infer_bench_predictors"),
                        help="where the traces are recorded (reused when present)")
    parser.add_argument("--train-tokens", type=int, default=500_000)
    parser.add_argument("--eval-tokens", type=int, default=24_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=None, help="training time limit per learned predictor")
    parser.add_argument("--sim-sequences", type=int, default=24, help="sequences of each trace the simulator replays")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded in the executor run")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tune", action="store_true",
                        help="search the learned predictors' hyperparameters on the validation text first "
                             "(predictors-tune.json/.md) and use the best")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of predictors.json and predictors.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
               "python": platform.python_version(),
               "command": " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)]),
               "args": {"epochs": args.epochs, "train_tokens": args.train_tokens, "eval_tokens": args.eval_tokens,
                        "max_seconds": args.max_seconds, "tune": args.tune},
               "models": []}

    def write(partial_model: dict | None = None) -> None:
        """Rewrite the result files with every finished row so far (an interrupted run keeps them)."""
        snapshot = {**results, "models": [*results["models"], *([partial_model] if partial_model else [])]}
        (args.out / "predictors.json").write_text(json.dumps(snapshot, indent=1))
        (args.out / "predictors.md").write_text(markdown(snapshot))
        if args.tune:
            (args.out / "predictors-tune.json").write_text(json.dumps(
                {**snapshot, "models": [{k: m[k] for k in ("model", "traces", "tuning", "tuned") if k in m}
                                        for m in snapshot["models"]]}, indent=1))
            (args.out / "predictors-tune.md").write_text(tuning_markdown(snapshot))

    for name in args.models:
        results["models"].append(run_model(name, args, write))
        write()
    print(markdown(results))
    print(f"wrote {args.out / 'predictors.json'} and {args.out / 'predictors.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
