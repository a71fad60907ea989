"""Incremental detokenization: UTF-8 safe, stop strings never half-streamed, on real tokenizers."""

from __future__ import annotations

import pytest

from models import LoadedModel
from server.detokenizer import REPLACEMENT_CHAR, Detokenizer

MIXED = "Café au lait ☕ costs 3€; 日本語のテキスト, 한국어 문장 and emoji 😀🚀🎉👍🏽 — naïve façade."


@pytest.fixture(params=["tiny", "smol"])
def tokenizer(request: pytest.FixtureRequest):
    loaded: LoadedModel = request.getfixturevalue(request.param)
    return loaded.tokenizer


def stream(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detokenizer = Detokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        deltas.append(detokenizer.push(token))
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_emoji_and_cjk_stream_intact(tokenizer) -> None:
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    assert len(ids) > len(MIXED.split()), "multi-byte characters should span several tokens"
    deltas, _ = stream(tokenizer, MIXED)
    assert "".join(deltas) == MIXED
    assert not any(REPLACEMENT_CHAR in d for d in deltas), "half a character was emitted"


def test_a_stop_string_spanning_tokens_is_never_partly_streamed(tokenizer) -> None:
    text = "The answer is forty-two, as everyone knows by now."
    stop = "two, as every"
    deltas, detokenizer = stream(tokenizer, text, (stop,))
    assert detokenizer.stopped
    assert "".join(deltas) == "The answer is forty-"
    assert len(tokenizer.encode(stop, add_special_tokens=False)) > 1


def test_the_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    deltas, detokenizer = stream(tokenizer, "alpha beta gamma delta", ("delta", "beta g"))
    assert detokenizer.stopped and "".join(deltas) == "alpha "
    assert detokenizer.matched == "beta g"  # what Anthropic's stop_sequence reports


def test_a_stop_prefix_that_does_not_complete_is_released(tokenizer) -> None:
    text = "we stop at nothing, then stopover, then the end"
    deltas, detokenizer = stream(tokenizer, text, ("stopping",))
    assert not detokenizer.stopped and "".join(deltas) == text


def test_a_stop_string_inside_multibyte_text(tokenizer) -> None:
    deltas, detokenizer = stream(tokenizer, "行く前に😀止まれ、そして進め", ("止まれ",))
    assert detokenizer.stopped and "".join(deltas) == "行く前に😀"


def test_only_new_spans_are_decoded(tiny: LoadedModel) -> None:
    """Two offsets bound every decode to a short span: never the whole output per token."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: bool) -> str:
            lengths.append(len(ids))
            return tiny.tokenizer.decode(ids, **kwargs)

    detokenizer = Detokenizer(Counting())
    text = "a long line of plain words " * 20
    for token in tiny.tokenizer.encode(text):
        detokenizer.push(token)
    assert max(lengths) <= 4
