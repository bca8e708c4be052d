"""Accuracy of quantized experts: held-out bits per byte and greedy top-1 agreement of both shipped
tiny models with int8 and int4 experts against the unquantized model, and the relative output error
of one Mixtral-8x7B-shaped MoE layer.

    python scripts/quant_accuracy.py [--max-bytes 65536] [--layer-experts 8]

Held-out text: the corpus files `moe_infer.corpus.is_heldout` holds out (never trained on), cut into
512-byte windows as the models were evaluated when trained; bits per byte = the mean cross-entropy
of each next byte, in bits. Top-1 agreement: the fraction of positions whose argmax next byte is the
unquantized model's (teacher-forced on the same text). The Mixtral-shaped layer: H 4096, I 14336,
top-2 of `--layer-experts` experts with random normal weights (std 0.02, as the benchmarks use) and
64 random tokens, `reference_moe` against `reference_moe_quantized` in fp32. Writes
bench/results/quant_accuracy.jsonl (one line per row) and bench/results/quant_accuracy.md.
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
from moe_infer.corpus import is_heldout, stdlib_files
from moe_infer.experts.quant import QuantScheme, quantize
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


def mixtral_layer_errors(num_experts: int) -> dict[str, float]:
    hidden, inter, top_k, tokens = 4096, 14336, 2, 64
    generator = torch.Generator().manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=generator) * 0.02
    w2 = torch.randn(num_experts, hidden, inter, generator=generator) * 0.02
    x = torch.randn(tokens, hidden, generator=generator)
    scores = torch.randn(tokens, num_experts, generator=generator).softmax(-1)
    weights, ids = scores.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    want = reference_moe(x, w13, w2, ids, weights)
    errors = {}
    for name, scheme in SCHEMES.items():
        q13, q2 = quantize(w13, scheme), quantize(w2, scheme)
        got = reference_moe_quantized(x, q13, q2, ids, weights)
        errors[name] = float((got - want).norm() / want.norm())
        del q13, q2, got
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=65536)
    parser.add_argument("--layer-experts", type=int, default=2,
                        help="experts of the Mixtral-shaped layer (0: skip); 8 needs about 4 GB for the float "
                             "weights alone, and a run with 8 beside other jobs was killed before it wrote anything")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    machine = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    command = "python scripts/quant_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    windows = heldout_windows(args.max_bytes)
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_accuracy.jsonl"), "a") as f:  # the model rows first: the layer is the heavy part
        for row in rows:
            f.write(json.dumps({**row, "device": machine, "torch": torch.__version__, "command": command}) + "\n")
    layer = mixtral_layer_errors(args.layer_experts) if args.layer_experts else {}
    for scheme_name, error in layer.items():
        print(f"Mixtral-shaped layer ({args.layer_experts} experts) {scheme_name}: relative output error {error:.4f}")
    record = {"device": machine, "torch": torch.__version__, "command": command, "heldout_bytes": windows.numel(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_accuracy.jsonl"), "a") as f:
        if layer:
            f.write(json.dumps({"mixtral_layer_rel_error": layer, "layer_experts": args.layer_experts, **record}) + "\n")
    lines = ["# Accuracy of quantized experts\n", f"Machine: {machine}; torch {torch.__version__}. Command: `{command}`.",
             f"Held-out text: {windows.numel():,} bytes of the held-out corpus files in {WINDOW}-byte windows. "
             f"Aims: int8 within 0.5% of the bits per byte with >= 99% top-1 agreement; int4-g128 within 3% "
             f"with >= 95%.\n",
             "| model | experts | bits/byte | vs float32 | top-1 agreement | aim met |", "|---|---|---|---|---|---|"]
    for row in rows:
        aim = "" if "meets_aim" not in row else ("yes" if row["meets_aim"] else "no")
        lines.append(f"| {row['model']} | {row['scheme']} | {row['bpb']:.4f} | {row['bpb_increase']:+.2%} | "
                     f"{row['top1_agreement']:.2%} | {aim} |")
    if layer:
        lines += ["", f"Mixtral-8x7B-shaped layer (H 4096, I 14336, top-2 of {args.layer_experts} experts, random "
                      f"normal weights, 64 tokens, fp32): relative output error "
                  + ", ".join(f"{k} {v:.4f}" for k, v in layer.items()) + "."]
    with open(os.path.join(args.out, "quant_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
