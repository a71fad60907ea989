"""Batched generation looks, to every row, exactly like generating that row alone (real model, fp32).

The references are produced by the same engine one request at a time, and a few are checked against
transformers' own `generate`, an independent implementation, so a consistently wrong engine cannot pass.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from models import LoadedModel, attention, load
from server.engine import Engine
from server.request import FinishReason, SamplingParams
from tests.helpers import Result, collect, generate_alone, generate_together, run_with_engine

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father "
    "had taught him. There were one hundred and twelve of them, worn smooth in the middle by a century of "
    "boots. At the top he trimmed the wick, polished the great lens until it shone like still water, and "
    "watched the ships pass the reef that had claimed so many before the light was built. In winter the "
    "storms came in from the west, and the spray reached the gallery windows; in summer the fog rolled in "
    "so thick that the foghorn sounded through the night and the gulls fell silent. He kept a logbook of "
    "every vessel, every change in the wind, every broken pane, and on the last page of each volume he "
    "wrote a short letter to whoever would keep the light after him. Years later, when the lamp was "
    "automated and the keepers were sent ashore, those letters were found in a cupboard, tied with twine, "
    "forty volumes in all. They told of shipwrecks and rescues, of a whale that beached itself in the cove, "
    "of a daughter born during a gale and named after the lighthouse itself. Historians came to read them, "
    "and then novelists, and finally the children of the village, who learned their letters from the "
    "keeper's careful hand. The museum that holds them now lets visitors turn one page a day. "
)
QUESTIONS = [
    "Hi!",
    "What is the capital of Italy?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip, one per line.",
    "Translate 'good morning, my friend' into French and Spanish.",
]
LENGTHS = (5, 12, 24, 40, 64, 90, 128, 160, 200, 240, 270, 300)
MAX_TOKENS = 64


def build_prompts(loaded: LoadedModel) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    passage = tokenizer.encode(PASSAGE * 2, add_special_tokens=False)
    prompts = [passage[i : i + n] for i, n in enumerate(LENGTHS)]  # raw text slices, 5 to 300 tokens
    prompts += [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"] for q in QUESTIONS]
    return prompts


def greedy(max_tokens: int = MAX_TOKENS, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


@pytest.fixture(scope="module")
def prompts(smol: LoadedModel) -> list[list[int]]:
    result = build_prompts(smol)
    lengths = sorted(len(p) for p in result)
    assert len(result) >= 16 and lengths[0] <= 5 and lengths[-1] == 300
    return result


@pytest.fixture(scope="module")
def alone(smol: LoadedModel, prompts: list[list[int]]) -> list[Result]:
    # Raw passage slices never say EOS, chat prompts do: rows leave at different steps.
    return generate_alone(smol, prompts, [greedy()] * len(prompts))


def test_alone_matches_transformers_generate(smol_transformers: LoadedModel, prompts: list[list[int]], alone: list[Result]) -> None:
    for index in (0, 6, 11, 13):
        prompt = prompts[index]
        with torch.inference_mode():
            output = smol_transformers.model.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                eos_token_id=list(smol_transformers.info.eos_token_ids),
            )
        expected = output[0, len(prompt) :].tolist()
        assert alone[index].token_ids == expected, f"prompt {index} ({len(prompt)} tokens)"


def test_batched_equals_alone(smol: LoadedModel, prompts: list[list[int]], alone: list[Result]) -> None:
    together = generate_together(smol, prompts, [greedy()] * len(prompts))
    assert any(r.finish_reason is FinishReason.STOP for r in alone), "some rows should leave early on EOS"
    for index, (got, want) in enumerate(zip(together, alone, strict=True)):
        assert got.token_ids == want.token_ids, f"prompt {index} ({len(prompts[index])} tokens)"
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason


def test_batched_equals_alone_in_bfloat16_on_the_native_kernels(prompts: list[list[int]]) -> None:
    """Not float32's margin absorbing an ulp: every native kernel computes a row alone (tests/models/test_native.py),
    so bfloat16, whose rounding turns any ulp into a flipped near-tie, keeps batched == alone as well."""
    bf16 = load("default", dtype="bfloat16")
    if bf16.model.config._attn_implementation != attention.NATIVE:
        pytest.skip("models/native.cpp did not build or load here: bfloat16 on PyTorch's kernels is not batch invariant")
    params = [greedy()] * len(prompts)
    alone, together = generate_alone(bf16, prompts, params), generate_together(bf16, prompts, params)
    for index, (got, want) in enumerate(zip(together, alone, strict=True)):
        assert got.token_ids == want.token_ids, f"prompt {index} ({len(prompts[index])} tokens)"


def test_joining_and_leaving_mid_flight(smol: LoadedModel, prompts: list[list[int]], alone: list[Result]) -> None:
    """Requests arrive while others decode; others leave early by max_tokens, a stop string or a cancel."""
    long_index = next(i for i, r in enumerate(alone) if len(r.token_ids) == MAX_TOKENS and len(r.text) > 40)
    stop_text = alone[long_index].text[20:26]
    cut = alone[long_index].text.index(stop_text)

    async def scenario(engine: Engine) -> dict[str, object]:
        first = {i: asyncio.create_task(collect(engine.submit(prompts[i], greedy()))) for i in (1, 7, 11)}
        short = asyncio.create_task(collect(engine.submit(prompts[3], greedy(max_tokens=5))))
        stopped = asyncio.create_task(collect(engine.submit(prompts[long_index], greedy(stop=(stop_text,)))))
        cancelled_stream = engine.submit(prompts[9], greedy())
        received = 0
        async for event in cancelled_stream:  # read a few tokens, then walk away
            received += len(event.token_ids)
            if received >= 3:
                break
        await cancelled_stream.aclose()
        await _wait_for_steps(engine, 4)
        second = {i: asyncio.create_task(collect(engine.submit(prompts[i], greedy()))) for i in (0, 5, 13)}
        await _wait_for_steps(engine, engine.steps + 7)
        third = {i: asyncio.create_task(collect(engine.submit(prompts[i], greedy()))) for i in (2, 16)}
        results = {i: await task for i, task in {**first, **second, **third}.items()}
        return {"survivors": results, "short": await short, "stopped": await stopped, "cancel_tokens": received}

    outcome = run_with_engine(smol, scenario)
    for index, result in outcome["survivors"].items():
        assert result.token_ids == alone[index].token_ids, f"prompt {index} changed by its neighbours"
    short = outcome["short"]
    assert short.token_ids == alone[3].token_ids[:5] and short.finish_reason is FinishReason.LENGTH
    stopped = outcome["stopped"]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == alone[long_index].text[:cut]
    assert outcome["cancel_tokens"] >= 3


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(smol: LoadedModel, prompts: list[list[int]]) -> None:
    seeded = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    crowd = [SamplingParams(max_tokens=40, temperature=1.0, seed=i) for i in range(7)]
    alone = generate_alone(smol, [prompts[14]], [seeded])[0]
    busy = generate_together(smol, [prompts[i] for i in range(7)] + [prompts[14]], crowd + [seeded])
    assert busy[-1].token_ids == alone.token_ids
    assert busy[-1].text == alone.text
    other_seed = generate_alone(smol, [prompts[14]], [SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, top_k=50, seed=99)])[0]
    assert other_seed.token_ids != alone.token_ids, "a different seed should change a sampled answer"


async def _wait_for_steps(engine: Engine, steps: int) -> None:
    while engine.steps < steps:
        await asyncio.sleep(0.005)
