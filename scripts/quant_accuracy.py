"""Accuracy of quantized experts: held-out bits per byte and greedy top-1 agreement of both shipped
tiny models with int8 and int4 experts against the unquantized model, and the relative output error
of one Mixtral-8x7B-shaped MoE layer.

    python scripts/quant_accuracy.py [--max-bytes 65536] [--layer-experts 8]

Held-out text: the corpus files `moe_infer.traces.corpus.is_heldout` holds out (never trained on), cut into
512-byte windows as the models were evaluated when trained; bits per byte = the mean cross-entropy
of each next byte, in bits. Top-1 agreement: the fraction of positions whose argmax next byte is the
unquantized model's (teacher-forced on the same text). The Mixtral-shaped layer: H 4096, I 14336,
top-2 of `--layer-experts` (default 8) experts with random normal bf16 weights (std 0.02, as the
benchmarks use) and 64 random tokens; the layer output is `reference_moe` of the bf16 weights
against `reference_moe_quantized` of their int8 / int4-g128 quantization, both computed in fp32.
One expert at a time: it is drawn, its contribution to the output computed in both ways, and freed
before the next (its quantization in blocks of rows, which quantizes exactly as the whole weight:
every scale belongs to one row), so the peak memory is a few GiB, not the 4 GB of the float layer
(a run holding all 8 experts at once was killed for memory). `--layer-only` skips the models.
Writes bench/results/quant_accuracy.jsonl (one line per row) and bench/results/quant_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import moe_infer
from moe_infer import assets
from moe_infer.traces.corpus import is_heldout, stdlib_files
from moe_infer.experts.quant import QuantizedWeight, QuantScheme, quantize
from moe_infer.kernels import reference_moe, reference_moe_quantized

WINDOW = 512
SCHEMES = {"int8": QuantScheme("int8"), "int4-g128": QuantScheme("int4", 128)}
AIMS = {"int8": (0.005, 0.99), "int4-g128": (0.03, 0.95)}  # relative bpb increase at most, top-1 at least
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def heldout_windows(max_bytes: int) -> torch.Tensor:
    """[W, 512] byte windows of the held-out files, in path order, up to `max_bytes` bytes."""
    _, files = stdlib_files()
    data = bytearray()
    for rel, path in files:
        if is_heldout(rel):
            data += path.read_bytes()
            if len(data) >= max_bytes:
                break
    count = min(len(data), max_bytes) // WINDOW
    return torch.tensor(list(data[:count * WINDOW]), dtype=torch.long).view(count, WINDOW)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(bits per byte, argmax next byte [W, 511]) of `model` on the windows."""
    bits, count, argmax = 0.0, 0, []
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        logits = model(ids[:, :-1]).logits.float()
        bits += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item() / math.log(2)
        count += ids[:, 1:].numel()
        argmax.append(logits.argmax(-1))
    return bits / count, torch.cat(argmax)


ROW_BLOCK = 4096  # rows quantized at once (bounds the quantizer's fp32 temporaries to ~64 MiB each)


def quantize_by_rows(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """`quantize(weight, scheme)` of a 2-D weight, computed ROW_BLOCK rows at a time: the same
    tensors (every scale and zero point belongs to one row), a fraction of the temporaries."""
    blocks = [quantize(weight[r:r + ROW_BLOCK], scheme) for r in range(0, weight.shape[0], ROW_BLOCK)]
    cat = lambda role: None if blocks[0].parts().get(role) is None else torch.cat([b.parts()[role] for b in blocks])  # noqa: E731
    return QuantizedWeight(scheme, cat("qweight"), cat("scales"), cat("zeros"), weight.shape[1])


def mixtral_layer_errors(num_experts: int, hidden: int = 4096, inter: int = 14336, tokens: int = 64,
                         top_k: int = 2, log=print) -> dict:
    """Relative output error of one MoE layer of bf16 experts per scheme (see the module docstring),
    one expert in memory at a time. Returns {"rel_error": {scheme: e}, "expert_rel_error": {scheme:
    [per expert]}, "seconds", "peak_rss_bytes"}."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator)
    scores = torch.randn(tokens, num_experts, generator=generator).softmax(-1)
    weights, ids = scores.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    want = torch.zeros(tokens, hidden)
    got = {name: torch.zeros(tokens, hidden) for name in SCHEMES}
    per_expert = {name: [] for name in SCHEMES}
    for e in range(num_experts):
        g = torch.Generator().manual_seed(1000 + e)  # expert e's weights, whatever the order
        w13 = (torch.randn(2 * inter, hidden, generator=g) * 0.02).to(torch.bfloat16)
        w2 = (torch.randn(hidden, inter, generator=g) * 0.02).to(torch.bfloat16)
        mine = torch.where(ids == e, 0, -1)  # expert e as expert 0 of a one-expert layer; other ids skipped
        ref = reference_moe(x, w13.float()[None], w2.float()[None], mine, weights)
        want += ref
        for name, scheme in SCHEMES.items():
            q13, q2 = quantize_by_rows(w13, scheme), quantize_by_rows(w2, scheme)
            out = reference_moe_quantized(x, q13.map(lambda t: t[None]), q2.map(lambda t: t[None]), mine, weights)
            got[name] += out
            per_expert[name].append(float((out - ref).norm() / ref.norm()) if ref.norm() > 0 else 0.0)
            del q13, q2, out
        del w13, w2, ref
        log(f"  expert {e}: " + ", ".join(f"{n} {v[-1]:.4f}" for n, v in per_expert.items()) +
            f" ({time.perf_counter() - start:.0f} s, peak RSS {_peak_rss() / 2**30:.2f} GiB)")
    return {"rel_error": {name: float((got[name] - want).norm() / want.norm()) for name in SCHEMES},
            "expert_rel_error": per_expert, "seconds": time.perf_counter() - start, "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=65536)
    parser.add_argument("--layer-experts", type=int, default=8,
                        help="experts of the Mixtral-shaped layer (0: skip); one is in memory at a time")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    machine = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    command = "python scripts/quant_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    windows = heldout_windows(args.max_bytes)
    record = {"device": machine, "torch": torch.__version__, "command": command, "heldout_bytes": windows.numel(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in assets.names():
        reference, _ = assets.load_model(name)
        base_bpb, base_top1 = evaluate(moe_infer.wrap(reference), windows)
        rows.append({"model": name, "scheme": "float32", "bpb": base_bpb, "bpb_increase": 0.0, "top1_agreement": 1.0})
        for scheme_name, scheme in SCHEMES.items():
            model, _ = assets.load_model(name)
            bpb, top1 = evaluate(moe_infer.wrap(model, quantize=scheme), windows)
            increase = bpb / base_bpb - 1
            max_increase, min_top1 = AIMS[scheme_name]
            agreement = float((top1 == base_top1).float().mean())
            rows.append({"model": name, "scheme": scheme_name, "bpb": bpb, "bpb_increase": increase,
                         "top1_agreement": agreement, "meets_aim": increase <= max_increase and agreement >= min_top1})
            print(f"{name} {scheme_name}: {bpb:.4f} bits/byte ({increase:+.2%}), top-1 agreement {agreement:.2%}",
                  flush=True)
    with open(os.path.join(args.out, "quant_accuracy.jsonl"), "a") as f:  # the model rows first: the layer is the heavy part
        for row in rows:
            f.write(json.dumps({**row, **record}) + "\n")
    write_markdown(args, record, windows, rows, None)  # kept if the layer run is cut short
    if args.layer_experts:
        layer = mixtral_layer_errors(args.layer_experts, log=lambda line: print(line, flush=True))
        for scheme_name, error in layer["rel_error"].items():
            print(f"Mixtral-shaped layer ({args.layer_experts} experts) {scheme_name}: relative output error "
                  f"{error:.4f}")
        with open(os.path.join(args.out, "quant_accuracy.jsonl"), "a") as f:
            f.write(json.dumps({"mixtral_layer_rel_error": layer["rel_error"], "layer_experts": args.layer_experts,
                                "expert_rel_error": layer["expert_rel_error"], "layer_seconds": layer["seconds"],
                                "peak_rss_bytes": layer["peak_rss_bytes"], **record}) + "\n")
        write_markdown(args, record, windows, rows, layer)
    return 0


def write_markdown(args, record: dict, windows: torch.Tensor, rows: list[dict], layer: dict | None) -> None:
    lines = ["# Accuracy of quantized experts\n",
             f"Machine: {record['device']}; torch {record['torch']}; run {record['time']}. Command: "
             f"`{record['command']}`.",
             f"Held-out text: {windows.numel():,} bytes of the held-out corpus files in {WINDOW}-byte windows. "
             f"Aims: int8 within 0.5% of the bits per byte with >= 99% top-1 agreement; int4-g128 within 3% "
             f"with >= 95%.\n",
             "| model | experts | bits/byte | vs float32 | top-1 agreement | aim met |", "|---|---|---|---|---|---|"]
    for row in rows:
        aim = "" if "meets_aim" not in row else ("yes" if row["meets_aim"] else "no")
        lines.append(f"| {row['model']} | {row['scheme']} | {row['bpb']:.4f} | {row['bpb_increase']:+.2%} | "
                     f"{row['top1_agreement']:.2%} | {aim} |")
    if layer is None and args.layer_experts:
        lines += ["", "The Mixtral-shaped layer of this run has not finished (or was cut short)."]
    elif layer is not None:
        lines += ["", f"Mixtral-8x7B-shaped layer (H 4096, I 14336, top-2 of {args.layer_experts} experts, random "
                      f"normal bf16 weights (std 0.02), 64 random tokens; reference and quantized outputs both "
                      f"computed in fp32, one expert in memory at a time): relative output error "
                      f"||y_q - y|| / ||y||:", "",
                  "| experts | layer output | per expert (min-max) |", "|---|---|---|",
                  *(f"| {name} | {err:.4f} | {min(layer['expert_rel_error'][name]):.4f}-"
                    f"{max(layer['expert_rel_error'][name]):.4f} |" for name, err in layer["rel_error"].items()),
                  "", f"The layer took {layer['seconds']:.0f} s; peak RSS of the whole process (the tiny models "
                      f"included) {layer['peak_rss_bytes'] / 2**30:.2f} GiB."]
    with open(os.path.join(args.out, "quant_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
