"""Expert-routing traces: what was routed where, on disk and in memory, and what can be read from it.

- `trace`: the ``moe_infer.trace/1`` file format and the `Trace` class (read, write, validate,
  combine, split, import JSONL routing logs); `format`: the format's names, file dtypes and header
  checks; `jsonl`: parsing routing logs of other systems;
- `profiler`: running a wrapped model over text or prompts and recording a trace, streamed to disk
  in parts (`parts`: part traces and their merge into one file; `inputs`: the text and prompt files
  it reads);
- `stats`: statistics of a trace (load, entropy, predictability) and their reports;
- `popularity`: per-expert load, inter-layer affinity and the hot set (read by the cache and placement);
- `corpus`: the text the shipped tiny models were trained on and its held-out split.

Traces sit below the cache, the predictors and placement, which read a `Trace`; nothing here imports
them. The profiler is the exception by layer: it runs a wrapped model (docs/architecture.md).
Importing this package imports none of its modules (import the one you need).
"""

__all__ = ["corpus", "format", "inputs", "jsonl", "parts", "popularity", "profiler", "stats", "trace"]
