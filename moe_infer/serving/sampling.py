"""Choosing a request's next token the way `model.generate` does, one request at a time.

Owns the merge of a request's generation fields into the model's `GenerationConfig` (exactly as
`generate(**fields)` merges its keyword arguments: the fields, then the model's generation config,
then transformers' global defaults), and, per request, the logits processors and stopping criteria
transformers builds from that config (temperature, top-k, top-p, min-p, repetition penalty,
no-repeat n-grams, sequence bias, min new tokens, eos lists, max length, stop strings, ...), the
request's own ``torch.Generator`` and the greedy / multinomial choice of `generate`'s sampling loop.
It does not batch, schedule or detokenize (`moe_infer.serving.batching`, `moe_infer.serving.engine`,
`moe_infer.serving.text`).

Why one request at a time: processors read the request's own token history (repetition penalty,
n-grams, min new tokens) and each request samples with its own generator seeded from its seed, so
a request gets the same tokens whichever micro-batch it decodes in, and alone.

transformers builds processors and criteria in private methods of `GenerationMixin`
(`_prepare_generation_config`, `_prepare_special_tokens`, `_prepare_generated_length`,
`_get_logits_processor`, `_get_stopping_criteria`); this module is the one place that calls them,
and the test suite checks the distributions it samples from against `generate`'s own scores.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from moe_infer.errors import ConfigError

__all__ = ["SamplingParams", "RequestSampler", "sampling_params"]


@dataclass(frozen=True)
class SamplingParams:
    """A merged `GenerationConfig` and whether its lengths were left at transformers' defaults (which
    `generate` treats differently: a default ``max_length`` counts new tokens and is capped at the
    model's context)."""

    config: Any  # transformers.GenerationConfig
    default_max_length: bool
    default_min_length: bool

    @property
    def do_sample(self) -> bool:
        return bool(self.config.do_sample)


def sampling_params(model: nn.Module, **fields: Any) -> SamplingParams:
    """``model.generation_config`` with ``fields`` applied as ``model.generate(**fields)`` applies them.

    ``TypeError`` names a field that is not a `GenerationConfig` field; ``ValueError`` refuses values
    transformers refuses, and decoding modes other than greedy search and multinomial sampling
    (beam search, contrastive search, constrained or assisted decoding) and ``num_return_sequences > 1``.
    """
    from transformers.generation import GenerationMode

    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        raise ConfigError(f"{type(model).__name__} has no generation_config: not a transformers generative model")
    config, unused = model._prepare_generation_config(None, **fields)
    if unused:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, sorted(unused)))}: not "
                        f"GenerationConfig fields")
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ConfigError(f"decoding mode {mode.value!r} is not supported here; only greedy search (do_sample=False) "
                         f"and multinomial sampling (do_sample=True) with num_beams=1")
    if (config.num_return_sequences or 1) != 1:
        raise ConfigError(f"num_return_sequences={config.num_return_sequences}: one sequence per request here "
                         f"(send the request several times, with other seeds)")
    return SamplingParams(config=config,
                          default_max_length=fields.get("max_length") is None and generation_config.max_length is None,
                          default_min_length=fields.get("min_length") is None and generation_config.min_length is None)


class RequestSampler:
    """The token choices of one request: its processors, stopping criteria, generator and history.

    ``prompt``: the request's prompt token ids. ``seed``: its generator's seed (sampling only).
    ``tokenizer``: needed only when the config has ``stop_strings``. ``device``: where the logits
    live (the processors run there). Raises ``ValueError`` when the config leaves no room for a new
    token after the prompt (``max_length``), as `generate` does.
    """

    def __init__(self, model: nn.Module, params: SamplingParams, prompt: Sequence[int], seed: int = 0, *,
                 tokenizer=None, device: torch.device | str | None = None):
        from transformers.generation.stopping_criteria import MaxLengthCriteria, MaxTimeCriteria, StoppingCriteriaList

        device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        config = copy.deepcopy(params.config)  # the helpers below write into it
        prompt = list(prompt)
        model._prepare_special_tokens(config, True, device=device)
        model._prepare_generated_length(config, params.default_max_length, params.default_min_length, "input_ids",
                                        len(prompt), None)
        if config.max_length <= len(prompt):
            raise ConfigError(f"the prompt has {len(prompt)} tokens and max_length is {config.max_length}: no room for "
                             f"a new token (set max_new_tokens)")
        self.config = config
        self.prompt_length = len(prompt)
        self._ids = torch.empty(1, config.max_length, dtype=torch.long, device=device)  # prompt + every new token
        self._ids[0, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.length = len(prompt)
        self.processors = model._get_logits_processor(config, input_ids_seq_length=len(prompt),
                                                      encoder_input_ids=self._ids[:, :len(prompt)], device=device)
        self.criteria = model._get_stopping_criteria(config, StoppingCriteriaList(), tokenizer=tokenizer)
        self._length_criteria = (MaxLengthCriteria, MaxTimeCriteria)
        self.do_sample = bool(config.do_sample)
        self.generator = torch.Generator().manual_seed(int(seed)) if self.do_sample else None
        self.done = False
        self.finish_reason: str | None = None  # "stop" (eos, a stop string) or "length" (max length or time)

    @property
    def input_ids(self) -> Tensor:
        """[1, n]: the prompt and the tokens chosen so far."""
        return self._ids[:, :self.length]

    @property
    def new_tokens(self) -> list[int]:
        return self._ids[0, self.prompt_length:self.length].tolist()

    def scores(self, logits: Tensor) -> Tensor:
        """The processed scores [V] `generate` samples from (softmax) or maximises, for the next-token
        logits [V] of this request, given its history."""
        return self.processors(self.input_ids, logits.float()[None].clone())[0]

    def choose(self, logits: Tensor) -> int:
        """The request's next token from its next-token logits [V]; records it and whether the request
        is now done (``done``, ``finish_reason``)."""
        scores = self.scores(logits)
        if self.do_sample:
            probabilities = torch.softmax(scores, dim=-1).cpu()
            token = int(torch.multinomial(probabilities, 1, generator=self.generator))
        else:
            token = int(torch.argmax(scores))
        self.record(token)
        return token

    def record(self, token: int) -> None:
        """Append ``token`` to the request's history and check the stopping criteria (``choose`` calls
        this; a caller replaying known tokens calls it directly)."""
        if self.done:
            raise RuntimeError("this request is done; no more tokens")
        self._ids[0, self.length] = token
        self.length += 1
        stopped = [bool(c(self.input_ids, None)[0]) for c in self.criteria]
        if any(stopped):
            self.done = True
            by_length = all(isinstance(c, self._length_criteria) for c, s in zip(self.criteria, stopped) if s)
            self.finish_reason = "length" if by_length else "stop"
