"""Prompt-lookup speculation: drafts from the row's own tokens, verified in one forward, change no output.

The drafting is plain numbers (unit tests); the verification must give exactly the greedy output, checked
on the tiny model (fast, and its random weights repeat themselves, so drafts are accepted) and on the real
model over prompts where lookup pays (summaries, edits) and where it does not (open questions).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models import LoadedModel, load
from models.batch import Batch
from models.kv_cache import CacheShape
from models.runner import ModelRunner
from server import metrics
from server.request import SamplingParams
from server.speculation import eligible, propose
from tests.helpers import BUDGETS, Result, Row, collect, run_with_engine

SPECULATING = replace(BUDGETS, speculative_tokens=5)


def test_propose_continues_the_latest_occurrence_of_the_longest_tail() -> None:
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 8, 2, 3]
    # The tail (2, 3) occurred at 1-2 (then 9) and at 5-6 (then 7, 8): the latest wins.
    assert propose(tokens, 2) == [7, 8]
    assert propose(tokens, 10) == [7, 8, 2, 3]  # up to k tokens, as far as the sequence goes
    # A longer tail beats a nearer shorter one: (1, 2, 3) matched at the start continues with 9.
    assert propose([1, 2, 3, 9, 5, 2, 3, 6, 1, 2, 3], 1) == [9]
    assert propose([4, 5, 6], 3) == []  # nothing repeats
    assert propose(tokens, 0) == []
    assert propose([7, 7, 7], 3) == [7]  # overlapping the tail itself
    assert propose([1, 5, 2, 5], 3) == []  # one matching token is too weak a hint


def test_only_plain_greedy_rows_speculate() -> None:
    def row(**params: object) -> Row:
        return Row([1, 2], [3], SamplingParams(max_tokens=10, **params))

    assert eligible(row(temperature=0))
    for params in (
        {"temperature": 0.7},
        {"temperature": 0, "repetition_penalty": 1.2},
        {"temperature": 0, "presence_penalty": 0.5},
        {"temperature": 0, "frequency_penalty": 0.5},
        {"temperature": 0, "logprobs": 0},
        {"temperature": 0, "min_tokens": 5},
    ):
        assert not eligible(row(**params)), params


def test_extend_equals_decoding_one_token_at_a_time() -> None:
    """Several tokens fed in one forward leave the cache, positions and logits of feeding them one by one."""
    model = load("tiny", fuse=False).model  # transformers' own forward, called here directly
    prompt, more = [5, 9, 13, 2, 7], [4, 8, 15, 16]

    def run(chunks: list[list[int]]) -> tuple[torch.Tensor, Batch]:
        batch: Batch[str] = Batch(CacheShape.of(model), max_rows=1)
        step = batch.prefill(["row"], [prompt])
        logits = []
        with torch.inference_mode():
            model(input_ids=step.input_ids, position_ids=step.position_ids, attention_mask=step.attention_mask,
                  cache=step.cache, use_cache=True)  # fmt: skip
            for chunk in chunks:
                step = batch.extend([chunk])
                out = model(input_ids=step.input_ids, position_ids=step.position_ids,
                            attention_mask=step.attention_mask, cache=step.cache, use_cache=True)  # fmt: skip
                logits.append(out.logits[0])
        return torch.cat(logits), batch

    together, batch = run([more])
    one_by_one, _ = run([[t] for t in more])
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert batch.lengths == [len(prompt) + len(more)]
    step = batch.extend([[1, 2]])
    assert step.position_ids.tolist() == [[9, 10]]
    batch.rewind(2)
    assert batch.lengths == [9] and batch.end == 9


def generate(loaded: LoadedModel, prompts: list[list[int]], max_tokens: int, budgets=BUDGETS) -> list[Result]:
    async def scenario(engine) -> list[Result]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        return [await collect(engine.submit(p, params)) for p in prompts]

    return run_with_engine(loaded, scenario, budgets)


def accepted_tokens() -> float:
    return metrics.SPECULATIVE_TOKENS.labels("accepted")._value.get()


def test_verify_keeps_the_agreeing_prefix_and_the_models_own_next_token(tiny: LoadedModel) -> None:
    prompt = [5, 9, 13, 2, 7, 11]
    plain, row = ModelRunner(tiny.model, max_rows=1), Row(prompt)
    row.output_ids.append(plain.prefill([row])[0].token)
    for _ in range(8):
        row.output_ids.append(plain.decode()[0].token)
    greedy = row.output_ids  # t0 .. t8

    runner, row = ModelRunner(tiny.model, max_rows=1), Row(prompt)
    row.output_ids.append(runner.prefill([row])[0].token)
    # A right draft is kept whole, plus the model's next token.
    made = [s.token for s in runner.verify(greedy[1:4])]
    assert made == greedy[1:5]
    row.output_ids += made
    assert runner.batch.lengths == [len(prompt) + 4]  # t0..t3 cached; t4 is fed next
    # A draft wrong at its second token keeps the first, then the model's own choice; the rest is rewound.
    wrong = greedy[5] + 1
    made = [s.token for s in runner.verify([greedy[5], wrong, wrong])]
    assert made == greedy[5:7]
    row.output_ids += made
    assert runner.batch.lengths == [len(prompt) + 6]
    # A draft wrong at once still gives the step's one greedy token.
    assert [s.token for s in runner.verify([greedy[7] + 1])] == [greedy[7]]
    row.output_ids.append(greedy[7])
    assert runner.decode()[0].token == greedy[8]  # the cache after rewinds is the plain one


def test_speculation_changes_no_token_on_the_tiny_model(tiny: LoadedModel) -> None:
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], list(range(10, 60)), [7] * 12]
    plain = generate(tiny, prompts, 40)
    fast = generate(tiny, prompts, 40, SPECULATING)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in fast] == [r.finish_reason for r in plain]


SUMMARY_TEXT = (
    "The city council met on Tuesday to discuss the new bridge across the river. The mayor said the bridge "
    "would cost forty million dollars and take three years to build. Several residents spoke against the "
    "plan, saying the money should go to schools instead. The council voted five to two to approve the first "
    "stage of the project, a study of the river bed that will take six months."
)
PROMPTS = [
    f"Summarize this article in two sentences:\n\n{SUMMARY_TEXT}",
    f"Repeat the following text exactly:\n\n{SUMMARY_TEXT}",
    "Fix the spelling in this text: 'The councel voted five to two to aprove the first stage of the projet.'",
    "Rewrite this in the past tense: 'The ferry leaves at dawn, the captain reads the sky, the cook reads a novel.'",
    f"Extract every number from this text as a list:\n\n{SUMMARY_TEXT}",
    f"Who spoke against the plan, and why?\n\n{SUMMARY_TEXT}",
    "Write a Python function that returns the sum of a list, then call it on [1, 2, 3].",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List the days of the week, one per line.",
    "Explain in two sentences why the sky is blue.",
    "Count from one to twenty in words, separated by commas.",
]


@pytest.mark.slow
def test_speculation_changes_no_token_on_the_real_model(smol: LoadedModel) -> None:
    tokenizer = smol.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in PROMPTS
    ]
    plain = generate(smol, prompts, 48)
    before = accepted_tokens()
    fast = generate(smol, prompts, 48, SPECULATING)
    for prompt, a, b in zip(PROMPTS, plain, fast, strict=True):
        assert b.token_ids == a.token_ids, prompt
        assert b.text == a.text and b.finish_reason == a.finish_reason, prompt
    assert accepted_tokens() - before > 20  # summaries and copies do accept drafts
