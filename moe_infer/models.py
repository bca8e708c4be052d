"""Loading models by name and moving text in and out of them, for the CLI, demo and profiler.

A name is a shipped asset (`moe_infer.assets`), "random-mixtral" (an untrained Mixtral-shaped
model built from a config, for runs that need no trained weights), a `transformers` directory or
a hub id ("org/name", resolved through the hub cache by `moe_infer.hub`).
Models without a tokenizer are byte-level: their token ids are UTF-8 bytes.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from moe_infer.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_MODEL = "random-mixtral"


def random_mixtral() -> nn.Module:
    """An untrained 4-layer, 8-expert, top-2 Mixtral over bytes; the same weights every call."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024, bos_token_id=None,
                           eos_token_id=None, pad_token_id=0)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return MixtralForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(rng_state)  # the caller's random stream is untouched


def load_model(name: str, *, device: str | torch.device | None = None,
               dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for a shipped asset name or a transformers directory.

    ``device`` defaults to cuda when available. A directory without tokenizer files gives None:
    its token ids are then read as UTF-8 bytes (see ``encode_text``).
    """
    from moe_infer import assets, hub

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shipped = list(assets.names())
    if name == RANDOM_MODEL:
        model, tokenizer = random_mixtral(), None
    elif name in shipped:
        model, tokenizer = assets.load_model(name, dtype=torch_dtype)
    elif os.path.isdir(name) or hub.is_hub_id(name):
        name = hub.resolve(name)  # a hub id: its snapshot in the hub cache, downloaded if it is not there
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ConfigError(f"model {name!r}: the directory has no config.json; expected a "
                             "transformers model directory")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        has_tokenizer = any(os.path.exists(os.path.join(name, file))
                            for file in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(name) if has_tokenizer else None
    else:
        raise ConfigError(f"model {name!r}: not a shipped model ({', '.join(shipped) or 'none'}), "
                         f"not {RANDOM_MODEL!r}, not a directory and not a hub id ('org/name')")
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; without a tokenizer (byte-level random models) its UTF-8 bytes."""
    if tokenizer is None:
        return list(text.encode("utf-8"))
    # verbose=False: whole files are encoded at once and cut into windows later, so the
    # tokenizer's "longer than the maximum sequence length" warning does not apply
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def decode_tokens(tokenizer, token_ids: Sequence[int]) -> str:
    """The inverse of ``encode_text``; without a tokenizer, ids >= 256 are dropped."""
    if tokenizer is not None:
        return tokenizer.decode(list(token_ids))
    return bytes(i for i in token_ids if 0 <= i < 256).decode("utf-8", errors="replace")


def cache_argument(model: nn.Module, cache) -> dict[str, Any]:
    """Keyword arguments that pass the KV cache `cache` to `model`'s forward: transformers 5.24
    renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)."""
    forward = getattr(model.forward, "__func__", model.forward)
    return {"cache" if _takes_cache(forward) else "past_key_values": cache}


@functools.lru_cache(maxsize=64)
def _takes_cache(forward) -> bool:  # a signature costs tens of microseconds: once per class, not per step
    return "cache" in inspect.signature(forward).parameters


def output_cache(output) -> Any:
    """The KV cache a `transformers` model's forward returned (`cache` from 5.24, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
