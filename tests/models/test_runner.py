"""The runner's one-forward decode step with a prompt's chunk computes what the two forwards compute apart."""

from __future__ import annotations

import pytest

from models import LoadedModel
from models.runner import ModelRunner, Sampled
from server.request import SamplingParams
from tests.helpers import Row

CHUNK = 7


def scored(max_tokens: int = 64) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3)


def assert_same(got: list[Sampled], expected: list[Sampled]) -> None:
    """Same tokens, same top tokens, and scores equal to float32 rounding (a matrix product over more tokens
    may sum in another order)."""
    assert [s.token for s in got] == [s.token for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.logprobs.logprob == pytest.approx(theirs.logprobs.logprob, abs=1e-4)
        assert [t for t, _ in mine.logprobs.top] == [t for t, _ in theirs.logprobs.top]
        assert [p for _, p in mine.logprobs.top] == pytest.approx([p for _, p in theirs.logprobs.top], abs=1e-4)


def test_a_decode_step_carrying_a_chunk_gives_the_tokens_and_scores_of_the_two_apart(tiny: LoadedModel) -> None:
    """Three running rows of different lengths (so with left padding) decode while a 40-token prompt is read in
    chunks of 7; together, every step's tokens and scores equal those of a decode step and a chunk apart, and
    so do the long row's first token and the steps after it has joined."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    long_prompt = [20 + i % 50 for i in range(40)]

    def run(together: bool) -> list[list[Sampled]]:
        runner: ModelRunner[Row] = ModelRunner(tiny.model, max_rows=8)
        rows = [Row(list(p), params=scored()) for p in prompts]
        long = Row(long_prompt, params=scored())
        steps = [runner.prefill(rows)]
        for row, sampled in zip(rows, steps[0]):
            row.output_ids.append(sampled.token)
        read = 0
        while read < len(long_prompt):
            tokens = min(CHUNK, len(long_prompt) - read)
            if together:
                samples, first = runner.decode_with_chunk(long, tokens)
            else:
                samples = runner.decode()
                first = runner.prefill_chunk(long, tokens)
            read += tokens
            for row, sampled in zip(rows, samples, strict=True):
                row.output_ids.append(sampled.token)
            steps.append(samples if first is None else [*samples, first])
        long.output_ids.append(first.token)
        for _ in range(3):  # the long row decodes with the others
            samples = runner.decode()
            for row, sampled in zip([*rows, long], samples, strict=True):
                row.output_ids.append(sampled.token)
            steps.append(samples)
        return steps

    together, apart = run(together=True), run(together=False)
    assert len(together) == len(apart) == 1 + -(-40 // CHUNK) + 3
    for mine, theirs in zip(together, apart, strict=True):
        assert_same(mine, theirs)
