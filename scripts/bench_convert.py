"""Benchmark: converter peak RSS and GB/s, and peak RSS of `moe_infer.load` + a few decode steps, on a
synthetic full-size checkpoint (default: Mixtral-8x7B dimensions, 4 layers, ~11.9 GB).

    python scripts/bench_convert.py [--preset mixtral-8x7b] [--layers 4] [--workdir /tmp/moe_bench]
                                    [--cpu-memory 25%] [--decode-steps 3] [--keep]
                                    [--quantize none,int8,int4]

`--quantize` (the quantization column): the same synthetic checkpoint is also converted with
`--quantize int8` / `--quantize int4` (groups of 128) and each conversion is loaded with the SAME
`cpu_memory` byte budget (the percentage is of the float experts' bytes), so a quantized expert
being smaller means more of them fit; per format: one expert's bytes, cache slots, decode tokens/s,
bytes read from disk per decode token and the disk floor they imply, convert time and load peak
RSS. "none" is the float conversion the rest of the table describes.

Each phase runs in its own process under `/usr/bin/time -v` (peak RSS = its "Maximum resident set
size"; without /usr/bin/time, the child's `resource.getrusage` maximum). `--cpu-memory` is passed
to `load` as the MoEConfig field (a byte count, a size like "3GiB", or a percentage of all experts'
bytes); versions without the expert cache refuse it. Results: a JSON line appended to
bench/results/convert.jsonl and bench/results/convert.md (convert-quant.md for a run with --quantize
formats beside none). The synthetic files are deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

RESULTS = os.path.join("bench", "results")  # under the current directory, like every benchmark


def _vmrss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- phases (run in child processes)
def phase_convert(src: str, dst: str, quantize: str = "none") -> dict:
    from moe_infer.experts.convert import convert

    summary = convert(src, dst, quantize=None if quantize == "none" else quantize)
    return {"seconds": summary["seconds"], "bytes_read": summary["bytes_read"],
            "bytes_written": summary["bytes_written"], "peak_rss_self": _peak_self()}


def phase_load(path: str, cpu_memory: str | None, steps: int) -> dict:
    """Load, an 8-token prompt, then `steps` decode steps of one token (KV cache), timed apart; the
    bytes the store read during the decode steps give the disk floor of a decode step."""
    import torch

    import moe_infer
    from moe_infer.loading import expert_store_of
    from moe_infer.models import cache_argument, output_cache

    torch.manual_seed(0)
    drop_page_cache(path)  # every read of the decode steps comes from the disk, as in a real run
    fields = {} if cpu_memory is None else {"cpu_memory": int(cpu_memory) if cpu_memory.isdigit() else cpu_memory}
    start = time.perf_counter()
    model = moe_infer.load(path, **fields)
    load_s = time.perf_counter() - start
    rss_after_load = _vmrss()
    store = expert_store_of(model)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    expert_bytes = sum(store.expert_nbytes(l) * store.num_experts for l in store.moe_layers)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - start
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        read_before = store.bytes_read
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, **cache_argument(model, past), use_cache=True)
            past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
    stats = moe_infer.executor(model).stats()
    tier = stats["tiers"].get("cpu", {})
    return {"quantization": stats["quantization"], "store_dtype": str(store.compute_dtype).replace("torch.", ""),
            "slot_bytes": tier.get("slot_bytes"), "slots": tier.get("slots"),
            "load_seconds": load_s, "rss_after_load": rss_after_load, "dense_bytes": dense_bytes,
            "expert_bytes_total": expert_bytes, "expert_nbytes": store.expert_nbytes(store.moe_layers[0]),
            "prefill_seconds": prefill_s, "prompt_tokens": 8, "decode_seconds": decode_s, "new_tokens": steps,
            "decode_bytes_read": store.bytes_read - read_before, "expert_activations": stats["expert_activations"],
            "kernel": stats["kernel"], "memory": stats["memory"], "peak_rss_self": _peak_self()}


def drop_page_cache(root: str) -> None:
    """Ask the kernel to drop the cached pages of every file under `root` (written back first: it
    keeps dirty pages), so reads after this come from the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def phase_read(path: str) -> dict:
    """Sequential read speed of this disk, cold: every expert of the first MoE layer read once with
    positional reads after telling the kernel to drop those pages (no checksum: the disk alone)."""
    import torch

    from moe_infer.experts.store import ExpertStore

    drop_page_cache(path)  # what the converter's writes left in the page cache
    with ExpertStore.open(path, checksums="off") as store:
        layer = store.moe_layers[0]
        buffer = torch.empty(store.stored_nbytes(layer), dtype=torch.uint8)
        start = time.perf_counter()
        for e in range(store.num_experts):
            store.read_raw(layer, e, out=buffer, drop_page_cache=True)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": store.stored_nbytes(layer) * store.num_experts,
                "peak_rss_self": _peak_self()}


# -- driver
def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", *args]
    use_time = os.path.exists("/usr/bin/time")
    if use_time:
        cmd = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        result["peak_rss"] = int(match.group(1)) * 1024
        result["peak_rss_source"] = "/usr/bin/time -v"
    else:
        result["peak_rss"] = result["peak_rss_self"]
        result["peak_rss_source"] = "getrusage(RUSAGE_SELF) in the child"
    return result


def _cpu_memory_bytes(spec: str | None, expert_total: int) -> str | None:
    if spec is None:
        return None
    if spec.endswith("%"):
        return str(int(expert_total * float(spec[:-1]) / 100))
    return spec


def quant_row(fmt: str, conv: dict, load: dict, read: dict) -> dict:
    """One line of the quantization column, from a format's convert and load phases."""
    bytes_per_token = load["decode_bytes_read"] / load["new_tokens"]
    read_bps = read["bytes"] / read["seconds"]
    expected = None if fmt == "none" else ({"method": "int8"} if fmt == "int8" else {"method": "int4", "group_size": 128})
    if load["quantization"] != expected:  # the row measures the format it names, or it is not written
        raise SystemExit(f"{fmt}: the loaded model ran quantization {load['quantization']!r}, not {expected!r}")
    return {"format": fmt, "label": load["store_dtype"] if fmt == "none" else
            ("int8" if fmt == "int8" else "int4-g128"), "quantization": load["quantization"],
            "expert_nbytes": load["expert_nbytes"], "slot_bytes": load["slot_bytes"], "slots": load["slots"],
            "decode_tokens_per_s": load["new_tokens"] / load["decode_seconds"],
            "decode_bytes_read_per_token": bytes_per_token,
            "disk_floor_tokens_per_s": read_bps / bytes_per_token if bytes_per_token else None,
            "convert_seconds": conv["seconds"], "convert_bytes_written": conv["bytes_written"],
            "peak_rss": load["peak_rss"], "kernel": load["kernel"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="mixtral-8x7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/moe_bench_convert")
    parser.add_argument("--cpu-memory", default=None, help='expert budget for load: bytes, "3GiB", or "25%%"')
    parser.add_argument("--decode-steps", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    parser.add_argument("--quantize", default="none",
                        help="comma-separated formats to convert and load at the same budget: none (float), int8, "
                             "int4; the first is the float conversion of the main table and must be none")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.quantize.split(",") if f.strip()]
    if not formats or formats[0] != "none" or any(f not in ("none", "int8", "int4") for f in formats) \
            or len(set(formats)) != len(formats):
        parser.error(f"--quantize {args.quantize!r}: a comma-separated list starting with none, then int8 and/or int4")

    if args.phase:
        name, *rest = args.phase
        if name == "convert":
            out = phase_convert(*rest)
        elif name == "load":
            out = phase_load(rest[0], None if rest[1] == "-" else rest[1], int(rest[2]))
        else:
            out = phase_read(*rest)
        print(json.dumps(out))
        return 0

    import torch
    import transformers

    from moe_infer.experts.synthetic import preset_config, write_synthetic

    src = os.path.join(args.workdir, f"{args.preset}-{args.layers}l-hf")
    dst = os.path.join(args.workdir, f"{args.preset}-{args.layers}l-converted")
    os.makedirs(args.workdir, exist_ok=True)
    try:
        if not os.path.exists(os.path.join(src, "config.json")):
            shutil.rmtree(src, ignore_errors=True)
            start = time.perf_counter()
            made = write_synthetic(src, preset_config(args.preset, args.layers))
            print(f"synthetic checkpoint: {made['bytes'] / 1e9:.2f} GB in {made['shards']} shards "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        shutil.rmtree(dst, ignore_errors=True)
        conv = _run_child(["convert", src, dst])
        print(f"convert: {conv['bytes_written'] / 1e9:.2f} GB in {conv['seconds']:.1f} s "
              f"({conv['bytes_written'] / conv['seconds'] / 1e9:.2f} GB/s), peak RSS {conv['peak_rss'] / 2**20:.0f} MiB",
              flush=True)
        read = _run_child(["read", dst])
        print(f"store reads: {read['bytes'] / read['seconds'] / 1e9:.2f} GB/s over one layer's experts", flush=True)
        from moe_infer.experts.store import ExpertStore

        with ExpertStore.open(dst) as store:
            expert_total = sum(store.expert_nbytes(l) * store.num_experts for l in store.moe_layers)
        budget = _cpu_memory_bytes(args.cpu_memory, expert_total)
        load = _run_child(["load", dst, budget or "-", str(args.decode_steps)])
        quant_rows = [quant_row("none", conv, load, read)]
        for fmt in formats[1:]:  # the same source, the same budget (bytes), another format of the experts
            qdst = f"{dst}-{fmt}"
            shutil.rmtree(qdst, ignore_errors=True)
            qconv = _run_child(["convert", src, qdst, fmt])
            qload = _run_child(["load", qdst, budget or "-", str(args.decode_steps)])
            quant_rows.append(quant_row(fmt, qconv, qload, read))
            if not args.keep:
                shutil.rmtree(qdst, ignore_errors=True)
            row = quant_rows[-1]
            print(f"{fmt}: one expert {row['expert_nbytes'] / 2**20:.0f} MiB, {row['slots']} slots; decode "
                  f"{row['decode_tokens_per_s']:.3f} tokens/s, {row['decode_bytes_read_per_token'] / 1e9:.2f} GB read "
                  f"per token; convert {qconv['seconds']:.0f} s", flush=True)
        budget_bytes = int(budget) if budget and budget.isdigit() else 0
        margin = load["peak_rss"] - load["dense_bytes"] - budget_bytes
        rss_limit = int(1.15 * (load["dense_bytes"] + budget_bytes))
        decode_tps = load["new_tokens"] / load["decode_seconds"]
        read_bps = read["bytes"] / read["seconds"]
        bytes_per_token = load["decode_bytes_read"] / load["new_tokens"]
        floor_tps = read_bps / bytes_per_token if bytes_per_token else None
        print(f"load + {load['new_tokens']} decode steps: peak RSS {load['peak_rss'] / 2**20:.0f} MiB "
              f"(limit dense + budget + 15% = {rss_limit / 2**20:.0f} MiB; dense weights "
              f"{load['dense_bytes'] / 2**20:.0f} MiB, one expert {load['expert_nbytes'] / 2**20:.0f} MiB, "
              f"all experts {expert_total / 2**30:.1f} GiB, cpu_memory {budget}); decode {decode_tps:.3f} tokens/s, "
              f"{bytes_per_token / 1e9:.2f} GB read per token, disk floor "
              f"{'n/a' if floor_tps is None else f'{floor_tps:.3f}'} tokens/s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)

    record = {
        "bench": "convert", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": f"cpu ({os.cpu_count()} cores, shared: {platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "preset": args.preset, "layers": args.layers, "note": args.note,
        "convert": {"bytes_read": conv["bytes_read"], "bytes_written": conv["bytes_written"],
                    "seconds": conv["seconds"], "gb_per_s": conv["bytes_written"] / conv["seconds"] / 1e9,
                    "peak_rss": conv["peak_rss"], "peak_rss_source": conv["peak_rss_source"]},
        "store_read": {"bytes": read["bytes"], "seconds": read["seconds"],
                       "gb_per_s": read["bytes"] / read["seconds"] / 1e9, "peak_rss": read["peak_rss"]},
        "load_decode": {k: load[k] for k in ("load_seconds", "rss_after_load", "dense_bytes", "expert_nbytes",
                                             "prefill_seconds", "prompt_tokens", "decode_seconds", "new_tokens",
                                             "decode_bytes_read", "expert_activations", "kernel", "memory",
                                             "peak_rss", "peak_rss_source")},
        "decode_tokens_per_s": decode_tps, "decode_bytes_read_per_token": bytes_per_token,
        "disk_floor_tokens_per_s": floor_tps, "disk_floor_source": "store_read (cold sequential reads)",
        "expert_bytes_total": expert_total, "cpu_memory": budget, "rss_margin_over_dense_and_budget": margin,
        "rss_limit_dense_budget_15pct": rss_limit, "rss_within_limit": load["peak_rss"] <= rss_limit,
        "command": "python " + " ".join(["scripts/bench_convert.py", *(argv if argv is not None else sys.argv[1:])]),
        "quantization": quant_rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "convert.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    md = [
        f"# Converter and store-backed load: {args.preset}, {args.layers} layers ({record['time']})", "",
        f"Device: {record['device']}; torch {torch.__version__}, transformers {transformers.__version__}. "
        f"The machine's 2 cores are shared with other jobs: timings are indicative only. {args.note}", "",
        "| measurement | value |", "|---|---|",
        f"| checkpoint read / written | {conv['bytes_read'] / 1e9:.2f} GB / {conv['bytes_written'] / 1e9:.2f} GB |",
        f"| convert time, throughput | {conv['seconds']:.1f} s, {record['convert']['gb_per_s']:.2f} GB/s |",
        f"| convert peak RSS ({conv['peak_rss_source']}) | {mib(conv['peak_rss'])} |",
        f"| store read, one layer's {read['bytes'] // load['expert_nbytes']} experts, cold (page cache dropped) | "
        f"{record['store_read']['gb_per_s']:.2f} GB/s |",
        f"| load time, RSS after load | {load['load_seconds']:.1f} s, {mib(load['rss_after_load'])} |",
        f"| dense weights / one expert / all experts | {mib(load['dense_bytes'])} / {mib(load['expert_nbytes'])} / "
        f"{mib(expert_total)} |",
        f"| cpu_memory budget | {budget or 'none (no expert cache in this version: every call reads from the store)'} |",
        f"| load + prefill + {load['new_tokens']} decode steps: peak RSS | {mib(load['peak_rss'])} "
        f"(= dense + budget + {mib(margin)}; limit dense + budget + 15% = {mib(rss_limit)}: "
        f"{'within' if record['rss_within_limit'] else 'OVER'}) |",
        f"| prefill (8 tokens) | {load['prefill_seconds']:.1f} s |",
        f"| decode | {decode_tps:.3f} tokens/s ({load['new_tokens']} steps, kernel {load['kernel']}) |",
        f"| bytes read from disk per decode token | {bytes_per_token / 1e9:.2f} GB |",
        f"| disk floor (bytes per token / cold read speed) | "
        f"{'n/a' if floor_tps is None else f'{floor_tps:.3f}'} tokens/s |",
        "", f"Command: `{record['command']}`", "",
    ]
    if len(quant_rows) > 1:
        md[-2:-2] = [
            "", f"Quantization column: each format converted from the same checkpoint and loaded with the same "
            f"cpu_memory ({budget or 'none'} bytes), {load['new_tokens']} decode steps after an 8-token prompt, page "
            f"cache dropped first; disk floor = bytes read per token / the cold read speed above.", "",
            "| experts | one expert | cache slots | decode tokens/s | read from disk per decode token | disk floor "
            "| convert time | load + decode peak RSS |", "|---|---|---|---|---|---|---|---|",
            *(f"| {r['label']} | {mib(r['expert_nbytes'])} | {r['slots']} | {r['decode_tokens_per_s']:.3f} | "
              f"{r['decode_bytes_read_per_token'] / 1e9:.3f} GB | "
              f"{'n/a (nothing read)' if r['disk_floor_tokens_per_s'] is None else format(r['disk_floor_tokens_per_s'], '.3f') + ' tokens/s'} "
              f"| {r['convert_seconds']:.0f} s | {mib(r['peak_rss'])} |" for r in quant_rows), ""]
    name = "convert.md" if len(quant_rows) == 1 else "convert-quant.md"  # a quantization run keeps its own page
    with open(os.path.join(RESULTS, name), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
