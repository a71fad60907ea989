"""One table decides which features combine (server/features.py); every sampling field must be in it, and the
engine's deciders follow it."""

from __future__ import annotations

import dataclasses

import pytest

from server import features, speculation
from server.errors import InvalidRequest
from server.request import SamplingParams


def test_every_sampling_field_says_how_it_combines() -> None:
    """A field added to SamplingParams without a rule fails here, before it silently changes a speculated answer."""
    assert set(features.RULES) == {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.parametrize(
    ("values", "feature", "refused"),
    [
        ({}, "speculation", None),
        ({"temperature": 0.7}, "speculation", "temperature"),
        ({"presence_penalty": 0.5}, "speculation", "presence_penalty"),
        ({"logprobs": 0}, "speculation", "logprobs"),
        ({"prompt_logprobs": 1}, "prefix_reuse", "prompt_logprobs"),
        ({"prompt_logprobs": 1}, "chunking", "prompt_logprobs"),
        ({"beam_width": 2}, "chunking", "beam_width"),
        ({"beam_width": 2}, "speculation", "beam_width"),
        ({"seed": 3, "stop": ("x",), "min_tokens": 2}, "speculation", None),
    ],
)
def test_the_table_names_the_field_in_the_way(values: dict, feature: str, refused: str | None) -> None:
    params = SamplingParams(**{"temperature": 0.0, **values})
    assert features.refusal(feature, params) == refused
    assert features.allows(feature, params) == (refused is None)


def test_beam_search_and_speculation_follow_the_table() -> None:
    with pytest.raises(InvalidRequest) as refused:
        SamplingParams(temperature=0.0, beam_width=2, repetition_penalty=1.2)
    assert refused.value.param == "repetition_penalty"

    class Row:
        prompt_ids, output_ids, max_tokens = [1, 2, 3], [4], 10

        def __init__(self, params: SamplingParams) -> None:
            self.params = params

        def suppressed_token_ids(self) -> frozenset[int]:
            return frozenset()

    assert speculation.eligible(Row(SamplingParams(temperature=0.0)))
    assert not speculation.eligible(Row(SamplingParams(temperature=0.0, frequency_penalty=0.1)))
