"""Benchmark: what checking an expert's bytes costs, per hash, against the read itself.

    python scripts/bench_checksums.py [--mib 64] [--repeats 9] [--workdir /tmp]

Writes a file of `--mib` random MiB, then times (medians of `--repeats` runs, same process):
one positional read of it from the page cache (`os.preadv`, what `ExpertStore.read` does), and
each candidate hash over the buffer: sha256 and blake2b (hashlib), crc32 (zlib), xxh3_64 (xxhash,
the one `ExpertStore.read` uses). Reports GB/s and each hash's cost as a fraction of the read
(a page-cache read is the fastest read there is, so on a real disk the fraction is smaller).
Results: a JSON line appended to bench/results/checksums.jsonl and bench/results/checksums.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zlib

from moe_infer.cache.cpu_compute import _median_seconds  # warm-up, then the median of `repeats` runs

RESULTS = os.path.join("bench", "results")  # under the current directory, like every benchmark


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    import xxhash

    nbytes = args.mib << 20
    data = os.urandom(nbytes)
    path = os.path.join(args.workdir, f"moe_infer_bench_checksums_{os.getpid()}.bin")
    with open(path, "wb") as f:
        f.write(data)
    buffer = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_s = _median_seconds(lambda: os.preadv(fd, [buffer], 0), args.repeats)
    finally:
        os.close(fd)
        os.remove(path)
    hashes = {
        "sha256": lambda: hashlib.sha256(data).digest(),
        "blake2b": lambda: hashlib.blake2b(data).digest(),
        "crc32": lambda: zlib.crc32(data),
        "xxh3_64": lambda: xxhash.xxh3_64_digest(data),
    }
    rows = {name: _median_seconds(fn, args.repeats) for name, fn in hashes.items()}
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores visible, {platform.machine()}",
        "python": sys.version.split()[0], "xxhash": xxhash.VERSION, "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "mib": args.mib, "repeats": args.repeats, "note": args.note,
        "read_gbps": nbytes / read_s / 1e9,
        "hash_gbps": {name: nbytes / s / 1e9 for name, s in rows.items()},
        "hash_over_read": {name: s / read_s for name, s in rows.items()},
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "checksums.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    lines = [f"# Checksum cost against one positional read ({record['time']})", "",
             f"Machine: {record['machine']}; Python {record['python']}, xxhash {record['xxhash']}, zlib "
             f"{record['zlib']}. {args.note}".rstrip(), "",
             f"Command: `python scripts/bench_checksums.py --mib {args.mib} --repeats {args.repeats}`; medians of "
             f"{args.repeats} runs over one {args.mib} MiB buffer.", "",
             "| operation | GB/s | time as a fraction of the read |", "|---|---|---|",
             f"| os.preadv from the page cache (the read itself) | {record['read_gbps']:.2f} | 1.00 |"]
    lines += [f"| {name} | {record['hash_gbps'][name]:.2f} | {record['hash_over_read'][name]:.2f} |" for name in rows]
    with open(os.path.join(RESULTS, "checksums.jsonl")) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    lines += ["", "## All runs in checksums.jsonl (hash time / read time)", "",
              "| run (UTC) | machine | read GB/s | " + " | ".join(rows) + " |", "|---|---|---|" + "---|" * len(rows)]
    lines += [f"| {run['time']} | {run['machine']} | {run['read_gbps']:.2f} | "
              + " | ".join(f"{run['hash_over_read'].get(name, float('nan')):.2f}" for name in rows) + " |" for run in runs]
    lines += ["", "`ExpertStore.read` checks with xxh3_64 (manifest field `xxh3_64`); `verify` and the conversion "
              "fingerprint use sha256.", ""]
    with open(os.path.join(RESULTS, "checksums.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
