"""Serving: generation for many requests at once with expert-aware batching, in process
(`generate_many`) and behind the OpenAI-compatible server of `moe-infer serve`.

- `signatures`: how likely each request's next token is to use each expert (recent routing, or a
  predictor's routing of the next token);
- `schedule`: the partition of a pool into micro-batches that activate few distinct experts, the
  regroup decision, run statistics and the trace-driven replay (`simulate_schedule`);
- `kv_cache`: stacking requests' KV caches into micro-batches and cutting them back out;
- `batching`: the decode pool (admission, rounds, failure isolation) and `generate_many`;
- `sampling`: a request's next token as `model.generate` chooses it (transformers' logits
  processors and stopping criteria from the merged `GenerationConfig`, a generator per request);
- `text`: incremental detokenization and stop strings;
- `engine`: the one engine thread that drives the model: continuous, expert-aware batching with
  chunked prefill, a bounded pool and queue, cancellation, per-request failures;
- `metrics`: the Prometheus series of ``/metrics``;
- `app`: the FastAPI application (endpoints, request fields, OpenAI error shapes, streaming);
- `server`: loading the model and running the app under uvicorn (the CLI command);
- `process`: a server in a child process (the serving benchmark and the tests).

Importing this package or any module above but `app`, `metrics` and `server` needs none of the ``serve`` extra
(FastAPI, uvicorn, prometheus_client); those three do.
"""
