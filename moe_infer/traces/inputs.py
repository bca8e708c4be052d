"""What the profiler reads: a text file as token windows, and a JSONL file of prompts.

`text_windows` cuts a corpus file into windows of ``seq_len`` tokens (BOS first when the
tokenizer has one), reading it a block of lines at a time so a file is never held in memory whole;
`read_prompts` yields the prompts of a ``{"prompt": "..."}`` JSONL file; `check_inputs_exist`
fails before a model is loaded when an input is missing. They run no model: the profiler
(`profiler.py`) batches their sequences and records the trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from moe_infer.models import encode_text
from moe_infer.errors import ConfigError, MissingFile

# Text files are read this many characters at a time (cut at a line end), so a corpus file is
# never held in memory whole.
_TEXT_BLOCK_CHARS = 1 << 20


def check_inputs_exist(texts: Iterable[str | os.PathLike], prompts: str | os.PathLike | None) -> None:
    """Fail before any model is loaded when an input file is missing."""
    for path in [*texts, *([] if prompts is None else [prompts])]:
        if not os.path.isfile(path):
            raise MissingFile(f"input file {os.fspath(path)!r} does not exist")


def text_windows(path: str | os.PathLike, tokenizer, seq_len: int) -> Iterator[list[int]]:
    """Token windows of ``seq_len`` tokens covering the file in order (the last one shorter).

    The file is read a block of lines at a time. With a tokenizer that has a BOS token, every
    window starts with BOS followed by ``seq_len - 1`` text tokens.
    """
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    prefix = [] if bos is None else [bos]
    body = seq_len - len(prefix)
    if body < 1:
        raise ConfigError(f"seq_len={seq_len} leaves no room for text after the BOS token")
    pending: list[int] = []
    try:
        with open(path, encoding="utf-8") as file:
            while True:
                block = file.read(_TEXT_BLOCK_CHARS)
                if not block:
                    break
                if not block.endswith("\n"):
                    block += file.readline()  # cut at a line end, not inside a word
                pending.extend(encode_text(tokenizer, block, add_special_tokens=False))
                while len(pending) >= body:
                    yield prefix + pending[:body]
                    del pending[:body]
    except UnicodeDecodeError as error:
        raise ConfigError(f"{os.fspath(path)}: not UTF-8 text ({error})") from None
    if pending:
        yield prefix + pending


def read_prompts(path: str | os.PathLike) -> Iterator[str]:
    """The prompts of a JSONL file, one ``{"prompt": "..."}`` object per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f'{where}: expected an object {{"prompt": "<text>"}}, got {line.strip()[:80]}')
            yield record["prompt"]
