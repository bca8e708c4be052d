"""The text of a request's new tokens, released as soon as it is final: incremental detokenization
and stop strings.

Owns decoding token by token (a character split over several byte-level tokens is held back until
it is complete, the way streaming servers do it: decode a short window of the last tokens and take
what the newest token added) and the OpenAI ``stop`` semantics: generation ends at the first
occurrence of a stop string, and neither it nor anything after it is returned. Text that could be
the start of a stop string is held back until the next tokens decide it, so streamed pieces always
concatenate to the final text. Does not choose tokens (`moe_infer.serving.sampling`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TextAssembler", "token_text"]

_INCOMPLETE = "\ufffd"  # what a decoder gives for a partial UTF-8 sequence


def _decode(tokenizer, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    if tokenizer is None:  # byte-level model without tokenizer files: ids are UTF-8 bytes
        from moe_infer.models import decode_tokens

        return decode_tokens(None, token_ids)
    return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def token_text(tokenizer, token_id: int) -> str:
    """One token as text (special tokens included), as logprobs report it."""
    return _decode(tokenizer, [token_id], skip_special_tokens=False)


class TextAssembler:
    """Turns one request's new tokens into text; ``add`` returns what became final, ``finish`` the rest.

    ``stopped`` turns True when a stop string has appeared: the text ends before it, and later
    tokens add nothing. ``text`` is everything released so far.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self.text = ""  # released
        self._ids: list[int] = []
        self._window = 0  # first id of the decode window (context for the next token's text)
        self._read = 0  # ids whose text is in _decoded
        self._decoded = ""  # text of ids[:_read], not yet cut at a stop string

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._decode_pending(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a partial character, a possible stop-string start); no more tokens."""
        if self.stopped:
            return ""
        self._decode_pending(final=True)
        return self._release(final=True)

    def _decode_pending(self, *, final: bool) -> None:
        if self._read == len(self._ids):
            return
        before = _decode(self.tokenizer, self._ids[self._window:self._read])
        after = _decode(self.tokenizer, self._ids[self._window:])
        if not final and (len(after) <= len(before) or after.endswith(_INCOMPLETE)):
            return  # the newest tokens do not make a whole character yet
        self._decoded += after[len(before):]
        self._window, self._read = self._read, len(self._ids)

    def _release(self, *, final: bool) -> str:
        start = len(self.text)
        cut = self._first_stop(start)
        if cut is not None:
            self.stopped = True
            end = cut
        elif final:
            end = len(self._decoded)
        else:
            end = len(self._decoded) - self._possible_stop_start()
        piece = self._decoded[start:end]
        self.text += piece
        return piece

    def _first_stop(self, start: int) -> int | None:
        """Where the first stop string begins in the unreleased text (released text never holds one:
        any text that could begin one is held back)."""
        found = [i for i in (self._decoded.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _possible_stop_start(self) -> int:
        """Characters at the end of the decoded text that could be the start of a stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self._decoded)), held, -1):
                if self._decoded.endswith(stop[:size]):
                    held = size
                    break
        return held
