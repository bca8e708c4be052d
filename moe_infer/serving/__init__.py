"""Serving: what `moe-infer serve` is made of, and the token choice it shares with `generate_many`.

- `sampling`: a request's next token as `model.generate` chooses it (transformers' logits
  processors and stopping criteria from the merged `GenerationConfig`, a generator per request).
"""
