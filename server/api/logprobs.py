"""Scores as clients read them: chat's `logprobs.content` and completions' parallel lists.

The engine hands out raw numbers (token ids, log-probabilities, text offsets); this module names the
tokens, gives their UTF-8 bytes, and shapes OpenAI's two formats. JSON has no -inf: it is sent as -9999.0,
as vLLM does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from models.types import TokenLogprobs
from server.detokenizer import Detokenizer
from server.request import Scored

NEGATIVE_INFINITY = -9999.0


def finite(logprob: float) -> float:
    return logprob if logprob > NEGATIVE_INFINITY else NEGATIVE_INFINITY


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenNames(Protocol):
    """How scores name a token: its text, and its own UTF-8 bytes."""

    def text(self, token_id: int) -> str: ...

    def bytes(self, token_id: int) -> list[int]: ...


class TokenText:
    """Each token's text (special tokens spelled out) and its own UTF-8 bytes, cached per id.

    A token that is half of a character decodes to U+FFFD on its own, but its bytes are still its bytes:
    byte-level BPE vocabularies spell them out, SentencePiece byte-fallback tokens name them (<0xE2>).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._text = functools.lru_cache(maxsize=65536)(self._decode)
        self._bytes = functools.lru_cache(maxsize=65536)(self._raw_bytes)

    def text(self, token_id: int) -> str:
        return self._text(token_id)

    def bytes(self, token_id: int) -> list[int]:
        return list(self._bytes(token_id))

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self._special or not isinstance(piece, str):
            return self.text(token_id).encode("utf-8")
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self.text(token_id).encode("utf-8")


class TokenIds:
    """vLLM's `return_tokens_as_token_ids`: tokens named "token_id:<id>", unambiguous where texts collide."""

    def __init__(self, vocab: TokenNames) -> None:
        self._vocab = vocab

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"

    def bytes(self, token_id: int) -> list[int]:
        return self._vocab.bytes(token_id)


@dataclass(frozen=True)
class EchoedPrompt:
    """A prompt as completions' `echo` returns it: its text and where each token's text starts in it."""

    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer: Any, prompt_ids: Sequence[int]) -> EchoedPrompt:
        # The same incremental decoding as the output's, so offsets and text agree however tokens split characters.
        detokenizer = Detokenizer(tokenizer, skip_special_tokens=False)
        offsets, parts = [], []
        for token in prompt_ids:
            offsets.append(detokenizer.decoded_chars)
            parts.append(detokenizer.push(token))
        parts.append(detokenizer.flush())
        return cls("".join(parts), offsets)


def chat_content(scored: Sequence[Scored], top: int, vocab: TokenNames) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries for these tokens, each with its `top` most likely alternatives."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": vocab.text(token_id), "logprob": finite(logprob), "bytes": vocab.bytes(token_id)}

    return [
        {**entry(s.logprobs.token_id, s.logprobs.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.logprobs.top[:top]]}
        for s in scored
    ]


@dataclass
class CompletionLogprobs:
    """Completions' `logprobs`: four parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def empty(cls) -> CompletionLogprobs:
        return cls([], [], [], [])

    def add_prompt(
        self, prompt_ids: Sequence[int], scores: Sequence[TokenLogprobs], echoed: EchoedPrompt, vocab: TokenNames
    ) -> None:
        """The prompt's tokens: the first has no score (nothing predicts it), the others their `scores`."""
        self.tokens += [vocab.text(t) for t in prompt_ids]
        self.token_logprobs += [None, *(finite(s.logprob) for s in scores)]
        self.top_logprobs += [None, *(_top(s, vocab) for s in scores)]
        self.text_offset += echoed.offsets

    def add_output(self, scored: Sequence[Scored], shift: int, vocab: TokenNames) -> None:
        """Generated tokens; `shift` is the length of the text before the output (the echoed prompt)."""
        self.tokens += [vocab.text(s.logprobs.token_id) for s in scored]
        self.token_logprobs += [finite(s.logprobs.logprob) for s in scored]
        self.top_logprobs += [_top(s.logprobs, vocab) for s in scored]
        self.text_offset += [shift + s.text_offset for s in scored]

    def json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _top(scores: TokenLogprobs, vocab: TokenNames) -> dict[str, float]:
    """The k most likely tokens and, always, the chosen one (so up to k + 1 entries), as OpenAI answers."""
    top = {vocab.text(t): finite(lp) for t, lp in scores.top}
    top.setdefault(vocab.text(scores.token_id), finite(scores.logprob))
    return top
