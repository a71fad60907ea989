"""Beam search inside the running batch equals transformers' beam search (real model, fp32).

Each configuration (beam width x length_penalty x early_stopping) runs its prompts concurrently through one
engine, so the searches share the batch with each other; transformers' `generate` runs each prompt alone
with an explicit GenerationConfig. Chat prompts that end within the budget make length_penalty and
early_stopping matter; raw text slices of other lengths end at max_tokens.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from transformers import GenerationConfig

from models import LoadedModel
from server.engine import Engine
from server.request import FinishReason, Hypothesis, SamplingParams
from tests.helpers import collect, run_with_engine

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of Italy?", "Hi!", "What is 2+2?", "Who wrote Hamlet?", "Name a fruit."]
TEXT = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father had taught him."
MAX_TOKENS = 16
WIDTHS = (2, 4)
LENGTH_PENALTIES = (0.0, 1.0, 2.0)
EARLY_STOPPING = (False, True, "never")
CONFIGS = list(itertools.product(WIDTHS, LENGTH_PENALTIES, EARLY_STOPPING))
PROMPTS_PER_CONFIG = 2  # round-robin over the prompts: every prompt meets several configurations


def build_prompts(loaded: LoadedModel) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in QUESTIONS
    ]
    words = tokenizer.encode(TEXT, add_special_tokens=False)
    return chats + [words[:5], words[:12], words[:23]]


def returns(width: int) -> int:
    return width if width <= 2 else 3  # all of them, or fewer than the width


def beam_params(width: int, length_penalty: float, early_stopping: bool | str, **kwargs: object) -> SamplingParams:
    return SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        beam_width=width,
        beam_returns=returns(width),
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        **kwargs,
    )


def transformers_beams(loaded: LoadedModel, prompt: list[int], width: int, length_penalty: float, early_stopping: bool | str):
    eos = list(loaded.info.eos_token_ids)
    config = GenerationConfig(
        num_beams=width,
        num_return_sequences=returns(width),
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=eos[0],
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=config
        )
    beams = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist(), strict=True):
        tokens = sequence[len(prompt) :]
        if eos[0] in tokens:  # what follows the first end-of-sequence is padding
            tokens = tokens[: tokens.index(eos[0]) + 1]
        beams.append((tokens, score))
    return beams


def engine_beams(loaded: LoadedModel, cases: list[tuple[list[int], SamplingParams]]) -> list[tuple[Hypothesis, ...]]:
    """Every case at once through one engine: searches of all configurations share the batch."""

    async def scenario(engine: Engine) -> list[tuple[Hypothesis, ...]]:
        results = await asyncio.gather(*(collect(engine.submit(p, params)) for p, params in cases))
        return [r.events[-1].beams for r in results]

    return run_with_engine(loaded, scenario)


def test_beam_search_equals_transformers(smol: LoadedModel, smol_transformers: LoadedModel) -> None:
    prompts = build_prompts(smol)
    cycle = itertools.cycle(range(len(prompts)))
    cases = [(config, prompts[next(cycle)]) for config in CONFIGS for _ in range(PROMPTS_PER_CONFIG)]
    ours = engine_beams(smol, [(prompt, beam_params(*config)) for config, prompt in cases])
    stopped = 0
    for ((width, length_penalty, early_stopping), prompt), beams in zip(cases, ours, strict=True):
        reference = transformers_beams(smol_transformers, prompt, width, length_penalty, early_stopping)
        case = f"width {width}, length_penalty {length_penalty}, early_stopping {early_stopping!r}, prompt {prompt[-6:]}"
        assert len(beams) == len(reference), case
        for beam, (tokens, score) in zip(beams, reference, strict=True):
            assert list(beam.token_ids) == tokens, case
            assert beam.score == pytest.approx(score, abs=1e-4), case
            ended = tokens[-1] in smol.info.eos_token_ids
            assert beam.finish_reason is (FinishReason.STOP if ended else FinishReason.LENGTH), case
            stopped += ended
    # The configurations must have exercised finished hypotheses, not only sequences cut at max_tokens.
    assert stopped >= len(CONFIGS), stopped


def test_width_one_equals_greedy(smol: LoadedModel) -> None:
    prompts = build_prompts(smol)

    async def scenario(engine: Engine) -> tuple[list, list]:
        greedy = [collect(engine.submit(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))) for p in prompts]
        beams = [collect(engine.submit(p, beam_params(1, 1.0, False))) for p in prompts]
        return await asyncio.gather(*greedy), await asyncio.gather(*beams)

    greedy, beams = run_with_engine(smol, scenario)
    for g, b in zip(greedy, beams, strict=True):
        (beam,) = b.events[-1].beams
        assert list(beam.token_ids) == g.token_ids
        assert beam.text == g.text
        assert beam.finish_reason is g.finish_reason


def test_a_beam_search_in_a_busy_batch_equals_it_alone_and_leaves_its_neighbours_unchanged(smol: LoadedModel) -> None:
    prompts = build_prompts(smol)
    searches = [(prompts[0], beam_params(3, 1.0, False)), (prompts[6], beam_params(2, 2.0, "never"))]
    neighbours = [
        (prompts[i], SamplingParams(max_tokens=length, temperature=temperature, seed=i))
        for i, (length, temperature) in enumerate([(6, 0.0), (24, 0.8), (12, 0.0), (30, 0.0), (9, 0.7), (18, 0.0)])
    ]

    async def alone(engine: Engine) -> list:
        return [await collect(engine.submit(p, params)) for p, params in searches + neighbours]

    async def busy(engine: Engine) -> list:
        async def later(delay: float, prompt: list[int], params: SamplingParams):
            await asyncio.sleep(delay)  # neighbours join and leave while the searches run
            return await collect(engine.submit(prompt, params))

        cases = neighbours[:3] + searches + neighbours[3:]
        results = await asyncio.gather(*(later(0.15 * i, p, params) for i, (p, params) in enumerate(cases)))
        return results[3:5] + results[:3] + results[5:]

    expected, got = run_with_engine(smol, alone), run_with_engine(smol, busy)
    for want, have in zip(expected[:2], got[:2], strict=True):
        for a, b in zip(want.events[-1].beams, have.events[-1].beams, strict=True):
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason is b.finish_reason
            # float32 kernels move scores by a few ulps when the batch's shapes change (see tests/api/test_logprobs.py)
            assert a.score == pytest.approx(b.score, abs=1e-4)
    for want, have in zip(expected[2:], got[2:], strict=True):
        assert (have.token_ids, have.text, have.finish_reason) == (want.token_ids, want.text, want.finish_reason)
