"""Serving: the OpenAI-compatible server of `moe-infer serve`, and the token choice it shares with
`generate_many`.

- `sampling`: a request's next token as `model.generate` chooses it (transformers' logits
  processors and stopping criteria from the merged `GenerationConfig`, a generator per request);
- `text`: incremental detokenization and stop strings;
- `engine`: the one engine thread that drives the model: continuous, expert-aware batching with
  chunked prefill, a bounded pool and queue, cancellation, per-request failures;
- `metrics`: the Prometheus series of ``/metrics``;
- `app`: the FastAPI application (endpoints, request fields, OpenAI error shapes, streaming);
- `server`: loading the model and running the app under uvicorn (the CLI command);
- `process`: a server in a child process (the serving benchmark and the tests).

Importing this package, `sampling`, `text` or `engine` needs none of the ``serve`` extra
(FastAPI, uvicorn, prometheus_client); `app`, `metrics` and `server` do.
"""
