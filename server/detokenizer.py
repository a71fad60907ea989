"""Incremental detokenization for one request: UTF-8 safe, with stop strings that are never half-streamed.

Two offsets into the output ids, as in TGI and vLLM: text is decoded only for the span from
`prefix_offset`, and the part past what `[prefix_offset, read_offset)` decodes to is the new text.
Decoding a little context before the new tokens keeps tokenizers that merge spaces across tokens right,
and the whole output is never decoded again. A span that ends in U+FFFD is an incomplete UTF-8
character: it is held until the next token completes it.

Stop strings: text that could be the start of a stop string is held back until it either completes the
stop string (then it and everything after it are dropped) or can no longer match (then it is released).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], **kwargs: bool) -> str: ...


class Detokenizer:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held = ""
        self.stopped = False  # a stop string matched; no more text will be released
        self.matched: str | None = None  # the stop string that matched
        self.decoded_chars = 0  # characters decoded so far, released or held: where the next token's text starts
        self.released_chars = 0  # characters returned by push and flush

    @property
    def holding(self) -> bool:
        """Some decoded text, or some bytes of an incomplete character, have not been released yet."""
        return bool(self._held) or self._read_offset < len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit (often '')."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        new = self._new_text()
        if not new or new.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.decoded_chars += len(new)
        return self._release(new)

    def flush(self) -> str:
        """At the end of generation: whatever is still held, an incomplete character included."""
        if self.stopped:
            return ""
        new = self._new_text()
        self.decoded_chars += len(new)
        text = self._release(new, final=True)
        self._prefix_offset = self._read_offset = len(self._ids)
        return text

    def _new_text(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _release(self, text: str, final: bool = False) -> str:
        released = self._hold_back(text, final)
        self.released_chars += len(released)
        return released

    def _hold_back(self, text: str, final: bool) -> str:
        if not self._stop:
            return text
        buffer = self._held + text
        hits = [(at, stop) for stop in self._stop if (at := buffer.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped = True
            self._held = ""
            return buffer[:at]
        keep = 0 if final else self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
