"""A bounded load test of `moe-infer serve`: N requests at a given arrival rate against servers this
benchmark starts itself, ``expert`` against ``fcfs`` scheduling, with every expert resident and
under an expert budget, in one run.

For each row (scheduler x budget) a server process is started (`moe_infer.serving.process`; all
at once) with ``--scheduler`` and, for the budgeted rows, ``--cpu-memory`` (``--gpu-memory`` on
CUDA) set to ``--budget`` of the model's expert bytes. Each server gets two warm-up requests;
then, ``--repeats`` times and row after row (interleaved, so that a slow spell of a shared machine
hits every row alike), a load of ``--requests`` streamed completions sent by the official
`openai` async client at Poisson arrival times of ``--rate`` requests per second (the same seeded
times and prompts for every row; ``--rate 0`` sends them all at once). The table gives each row's
medians over its loads. Prompts are windows of held-out standard-library files (text the shipped models never
saw), of ``--prompt-tokens`` tokens each (a range ``MIN-MAX`` draws lengths). Decoding is greedy,
so every row generates the same tokens (checked) and does the same work.

Per row: output tokens/s over the whole load (first request sent to last token received), time
to first token and inter-token latency (p50, p99; measured by the client, per streamed chunk),
and from the server's ``/metrics`` (deltas over the load): distinct experts per decode micro-batch
(averaged over MoE layers), mean micro-batch size, expert-cache hit rate and bytes moved.

Appends one JSON line to ``serve.jsonl`` and writes ``serve.md`` in ``--out`` (default
``bench/results`` under the current directory).

    moe-infer bench serve                                  # tiny-mixtral, about 8 minutes on a 2-core CPU
    moe-infer bench serve --model tiny-deepseek --requests 64 --rate 8 --budget 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from moe_infer.errors import ConfigError
from moe_infer.helpformat import HelpFormatter

RESULTS = Path("bench") / "results"  # under the current directory
WARMUP_REQUESTS = 2


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny-mixtral", help="a shipped model or a transformers directory")
    parser.add_argument("--requests", type=int, default=48, help="requests of the load (after the warm-up)")
    parser.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second (Poisson); 0: all at once")
    parser.add_argument("--prompt-tokens", default="32-256", help="prompt length in tokens, N or MIN-MAX")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--max-batch-size", type=int, default=4, help="the servers' micro-batch size")
    parser.add_argument("--pool-size", type=int, default=16, help="the servers' running requests")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the servers' prefill tokens per step")
    parser.add_argument("--schedulers", nargs="+", default=["expert", "fcfs"], choices=["expert", "fcfs"])
    parser.add_argument("--budget", type=float, default=0.5,
                        help="the budgeted rows' expert bytes, as a fraction of the model's (0: no budgeted rows)")
    parser.add_argument("--device", default=None, help="the servers' device (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="the servers' intra-op threads (OMP_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every row, interleaved (row 1, row 2, ..., row 1, ...); the table gives medians")
    parser.add_argument("--seed", type=int, default=0, help="arrival times and prompts")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one row's load may take at most")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of serve.jsonl and serve.md")
    args = parser.parse_args(argv)
    args.command = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])
    low, _, high = args.prompt_tokens.partition("-")
    try:
        args.prompt_range = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(f"--prompt-tokens {args.prompt_tokens!r}: expected N or MIN-MAX") from None
    for name, value in (("--requests", args.requests), ("--max-tokens", args.max_tokens),
                        ("--max-batch-size", args.max_batch_size), ("--pool-size", args.pool_size),
                        ("--threads", args.threads), ("--prompt-tokens", min(args.prompt_range)),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(f"{name} {value}: expected a positive number")
    if args.rate < 0 or not 0 <= args.budget < 1:
        raise ConfigError(f"--rate {args.rate} must be >= 0 and --budget {args.budget} in [0, 1)")
    return args


def expert_bytes(model_name: str) -> int:
    """Bytes of all routed experts of the model, from a parameter-free skeleton (no weights loaded)."""
    import moe_infer
    import moe_infer.assets
    from moe_infer.experts.skeleton import skeleton
    from transformers import AutoConfig

    path = moe_infer.assets.path(model_name) if model_name in moe_infer.assets.names() else model_name
    model = moe_infer.wrap(skeleton(AutoConfig.from_pretrained(path)))
    return sum(layer.expert_source.expert_nbytes() * layer.num_experts for layer in moe_infer.executor(model).layers)


def make_prompts(args: argparse.Namespace) -> list[str]:
    """``--requests`` + warm-up windows of held-out stdlib text, lengths drawn from ``--prompt-tokens``
    (tokens of the byte-level shipped models are bytes; other tokenizers get about that many)."""
    from moe_infer.benchmarks.predictors import corpora

    rng = random.Random(args.seed)
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in corpora()["heldout"]]
    texts = [t for t in texts if len(t) > args.prompt_range[1] * 2]
    prompts = []
    for _ in range(args.requests + WARMUP_REQUESTS):
        text = rng.choice(texts)
        length = rng.randint(*args.prompt_range)
        start = rng.randrange(0, len(text) - length)
        prompts.append(text[start:start + length].encode("ascii", errors="ignore").decode()[:length] or "x")
    return prompts


def arrival_times(args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed + 1)
    times, now = [], 0.0
    for _ in range(args.requests):
        times.append(now)
        now += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    return times


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def one_request(client, model: str, prompt: str, max_tokens: int, delay: float, started: float) -> dict:
    await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
    sent = time.perf_counter()
    chunk_times, text, tokens, error = [], "", 0, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunk_times.append(time.perf_counter())
                text += chunk.choices[0].text
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as failure:  # noqa: BLE001 (a failed request is counted, not fatal)
        error = f"{type(failure).__name__}: {failure}"
    return {"sent": sent, "chunks": chunk_times, "text": text, "tokens": tokens, "error": error}


async def load(base_url: str, model: str, prompts: list[str], delays: list[float], args, *,
               warm_up: bool) -> tuple[list[dict], float]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=args.timeout) as client:
        for prompt in prompts[:WARMUP_REQUESTS] if warm_up else ():
            await one_request(client, model, prompt, 4, 0.0, time.perf_counter())
        started = time.perf_counter()
        tasks = [one_request(client, model, p, args.max_tokens, d, started)
                 for p, d in zip(prompts[WARMUP_REQUESTS:], delays)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
    return results, started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def server_for(args, scheduler: str, budget_bytes: int | None, device: str):
    from moe_infer.serving.process import ServerProcess

    server_args = ["--served-model-name", "bench", "--scheduler", scheduler, "--max-batch-size",
                   str(args.max_batch_size), "--pool-size", str(args.pool_size), "--max-queue", str(args.requests),
                   "--prefill-chunk", str(args.prefill_chunk), "--device", device]
    if budget_bytes is not None:
        server_args += ["--gpu-memory" if device.startswith("cuda") else "--cpu-memory", str(budget_bytes)]
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return ServerProcess(args.model, *server_args, env=env)


def run_load(args, server, device: str, prompts, delays, *, warm_up: bool) -> dict:
    """One load against ``server``: the client's measurements and the deltas of its /metrics."""
    before = scrape(server.url)
    results, started = asyncio.run(load(server.base_url, "bench", prompts, delays, args, warm_up=warm_up))
    after = scrape(server.url)
    ok = [r for r in results if r["error"] is None]
    ended = max((r["chunks"][-1] for r in ok if r["chunks"]), default=started)
    ttft = [r["chunks"][0] - r["sent"] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    tier = "gpu" if device.startswith("cuda") else "cpu"
    hits = delta(after, before, f'moe_infer_expert_cache_hits_total{{tier="{tier}"}}')
    misses = delta(after, before, f'moe_infer_expert_cache_misses_total{{tier="{tier}"}}')
    batches = delta(after, before, "moe_infer_distinct_experts_per_micro_batch_count")
    return {"requests": len(results), "completed": len(ok), "errors": sorted({r["error"] for r in results if r["error"]}),
            "output_tokens": tokens, "seconds": ended - started,
            "output_tokens_per_second": tokens / (ended - started) if ended > started else 0.0,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "micro_batches": batches,
            "distinct_experts_per_micro_batch": delta(after, before, "moe_infer_distinct_experts_per_micro_batch_sum")
            / batches if batches else None,
            "mean_micro_batch_size": delta(after, before, "moe_infer_micro_batch_size_sum") / batches if batches else None,
            "expert_hit_rate": hits / (hits + misses) if hits + misses else None,
            "expert_bytes_moved": delta(after, before, f'moe_infer_expert_bytes_moved_total{{tier="{tier}"}}'),
            "texts_sha256": hashlib.sha256(json.dumps([r["text"] for r in results]).encode()).hexdigest()}


def median_row(runs: list[dict]) -> dict:
    """One row from its repeated runs: the median of every measurement, the runs themselves kept."""
    row = {"requests": runs[0]["requests"]}
    row["completed"] = min(r["completed"] for r in runs)
    row["errors"] = sorted({e for r in runs for e in r["errors"]})
    for key in ("output_tokens_per_second", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
                "distinct_experts_per_micro_batch", "mean_micro_batch_size", "expert_hit_rate", "expert_bytes_moved"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["texts_sha256"] = runs[0]["texts_sha256"] if all(r["texts_sha256"] == runs[0]["texts_sha256"]
                                                         for r in runs) else None  # None: the runs differ
    row["runs"] = runs
    return row


def markdown(record: dict) -> str:
    args = record["args"]
    first = record["rows"][0]
    load = record["load_average"]
    lines = ["# Serving: a bounded load test of `moe-infer serve`", "",
             f"{record['date']}, {record['device']} (load average {load[0]:.1f} before, {load[1]:.1f} after: "
             f"other work shared the machine), server threads {args['threads']}, torch {record['torch']}, "
             f"transformers {record['transformers']}, Python {record['python']}. Command: `{record['command']}`.", "",
             f"Model {record['model']} ({record['expert_bytes'] / 2**20:.2f} MiB of routed experts). "
             f"{args['requests']} streamed greedy completions of {args['max_tokens']} tokens, prompts of "
             f"{args['prompt_tokens']} tokens cut from held-out stdlib files, "
             + (f"Poisson arrivals at {args['rate']:g} requests/s" if args["rate"] else "all sent at once")
             + f" (the same for every row), after {WARMUP_REQUESTS} warm-up requests; servers with "
             f"micro-batches of {args['max_batch_size']}, {args['pool_size']} running requests, prefill chunks of "
             f"{args['prefill_chunk']} tokens; one server process per row, all started at once, "
             f"{args['repeats']} loads of every row, interleaved; every cell is the median over the loads. Latencies are the client's (per streamed "
             "chunk); distinct experts per micro-batch (averaged over MoE layers), micro-batch size, hit rate and "
             "bytes moved come from the server's /metrics over the load. `same text`: every run of the row "
             "generated the text of row 1's first run, request for request.", "",
             "| scheduler | expert budget | completed | output tok/s (runs' range) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
             "| distinct experts / micro-batch | mean micro-batch | expert hit rate | expert MB moved | same text |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(value):
        return "-" if value is None else f"{value * 1e3:.0f}"

    def spread(row, key):
        values = [run[key] for run in row["runs"]]
        return f"{min(values):.0f}-{max(values):.0f}"

    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    for row in record["rows"]:
        budget = "all resident" if row["budget_bytes"] is None else \
            f"{row['budget_bytes'] / 2**20:.2f} MiB ({args['budget']:.0%})"
        lines.append(f"| {row['scheduler']} | {budget} | {row['completed']}/{row['requests']} | "
                     f"{row['output_tokens_per_second']:.1f} ({spread(row, 'output_tokens_per_second')}) | "
                     f"{ms(row['ttft_p50_s'])} / {ms(row['ttft_p99_s'])} | "
                     f"{ms(row['itl_p50_s'])} / {ms(row['itl_p99_s'])} | {number(row['distinct_experts_per_micro_batch'])} | "
                     f"{number(row['mean_micro_batch_size'])} | {number(row['expert_hit_rate'], 3)} | "
                     f"{row['expert_bytes_moved'] / 1e6:.1f} | "
                     f"{'yes' if row['texts_sha256'] and row['texts_sha256'] == first['texts_sha256'] else 'NO'} |")
    errors = sorted({e for row in record["rows"] for e in row["errors"]})
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import torch
    import transformers

    args = parse_args(argv, prog)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    total = expert_bytes(args.model)
    budget = int(total * args.budget) if args.budget else None
    prompts, delays = make_prompts(args), arrival_times(args)
    configurations = [(scheduler, budget_bytes) for budget_bytes in [None] + ([budget] if budget else [])
                      for scheduler in args.schedulers]
    runs: dict[tuple, list[dict]] = {c: [] for c in configurations}
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        # every row's server at once, started together and idle but for its own loads
        servers = {c: stack.enter_context(server_for(args, *c, device).launch()) for c in configurations}
        for server in servers.values():
            server.wait_ready()
        for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every row alike
            for configuration in configurations:
                run = run_load(args, servers[configuration], device, prompts, delays, warm_up=repeat == 0)
                runs[configuration].append(run)
                print(f"run {repeat + 1}/{args.repeats}: {configuration[0]}, budget {configuration[1]}: "
                      f"{run['completed']}/{run['requests']} completed, {run['output_tokens_per_second']:.1f} tok/s, "
                      f"distinct experts per micro-batch {run['distinct_experts_per_micro_batch']}", flush=True)
    rows = [dict(scheduler=c[0], budget_bytes=c[1], **median_row(runs[c])) for c in configurations]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "command": args.command, "model": args.model,
              "expert_bytes": total, "load_average": [load_before, os.getloadavg()[0]],
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "command", "prompt_range")},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "serve.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    report = markdown(record)
    (args.out / "serve.md").write_text(report)
    print(report)
    print(f"wrote {args.out / 'serve.jsonl'} and {args.out / 'serve.md'}")
    return 0 if all(row["completed"] == row["requests"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
