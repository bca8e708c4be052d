"""Tiny trained models shipped with moe_infer.

Two byte-level MoE causal LMs in plain Hugging Face ``transformers`` format, trained on the
Python standard library's own ``.py`` files by ``scripts/train_tiny_moe.py``:

* ``tiny-mixtral``  -- ``MixtralForCausalLM``, every layer MoE, 8 experts, top-2 softmax routing.
* ``tiny-deepseek`` -- ``DeepseekV3ForCausalLM``, first layer dense, then 1 shared + 32 routed
  experts, sigmoid scores with ``e_score_correction_bias``, grouped top-4 routing.

Token id = byte value (0..255); ``<|endoftext|>`` (id 256) is eos and pad. Each directory holds
``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files and a
``README.md`` model card with the training data, held-out bits/byte and routing statistics, and
``predictor-expertflow.safetensors``: an ``expertflow`` routing predictor for that model (what the
demo prefetches with; trained as its model card says).

>>> import moe_infer.assets
>>> model, tok = moe_infer.assets.load_model("tiny-mixtral")
"""

from __future__ import annotations

from pathlib import Path
from moe_infer.errors import ConfigError

_ROOT = Path(__file__).resolve().parent

__all__ = ["names", "path", "predictor_path", "load_model", "load_tokenizer"]
PREDICTOR_FILE = "predictor-expertflow.safetensors"


def names() -> list[str]:
    """Names of the shipped models (directories here that hold a ``config.json``), sorted."""
    return sorted(p.name for p in _ROOT.iterdir() if p.is_dir() and (p / "config.json").is_file())


def path(name: str) -> Path:
    """Directory of the shipped model ``name``; ``ValueError`` listing the valid names if unknown."""
    available = names()
    if not isinstance(name, str) or name not in available:
        raise ConfigError(f"unknown asset {name!r}; available: {', '.join(available) or '(none)'}")
    return _ROOT / name


def predictor_path(name: str) -> Path | None:
    """The ``expertflow`` predictor shipped for ``name`` (a ``MoEConfig.predictor`` value), or None."""
    file = path(name) / PREDICTOR_FILE
    return file if file.is_file() else None


def load_tokenizer(name: str):
    """The byte tokenizer of ``name`` (``AutoTokenizer.from_pretrained`` on the shipped files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path(name))


def load_model(name: str, dtype=None, device=None):
    """Load a shipped model and its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    ``dtype`` defaults to ``torch.float32`` (the stored precision); ``device`` (optional) moves
    the model after loading. Only local files are read.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = torch.float32
    directory = path(name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, load_tokenizer(name)
