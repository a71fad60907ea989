"""KV reuse: every prompt token is fed to the model once, then exactly one token per row per step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from models import LoadedModel
from models.forward import Forward
from server.engine import Engine
from server.request import SamplingParams
from tests.helpers import around_forward, collect, run_with_engine


@pytest.fixture
def calls(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, int]]:
    """Record the inputs of every forward the real tiny model runs."""
    recorded: list[dict[str, int]] = []

    def note(rows: int, queries: int, past: int, positions: torch.Tensor) -> None:
        recorded.append(
            {
                "rows": rows,
                "queries": queries,
                "past": past,  # cached columns each query also attends over
                # Positions count real tokens from 0 and pads sit at 0 before them: a row's last position
                # + 1 is its number of real tokens in this call.
                "real": int((positions[:, -1] - positions[:, 0] + 1).sum()) if queries > 1 else rows,
            }
        )

    def spy(inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        # A flattened forward (a decode step reading prompts) is recorded as its parts, each as a call of its own.
        for span in inputs.spans:
            positions = inputs.position_ids[0, span.tokens].view(span.rows, span.q)
            note(span.rows, span.q, span.mask.shape[-1] - span.q, positions)
        if not inputs.spans:
            rows, queries = inputs.input_ids.shape
            note(rows, queries, inputs.attention_mask.shape[-1] - queries, inputs.position_ids)
        return run()

    around_forward(monkeypatch, spy)
    return recorded


def test_each_prompt_token_is_fed_once_then_one_token_per_row_per_step(tiny: LoadedModel, calls: list) -> None:
    prompts = [list(range(10, 10 + n)) for n in (3, 17, 8, 30, 5)]
    max_tokens = [12, 7, 20, 4, 9]

    async def scenario(engine: Engine) -> list:
        tasks = []
        for prompt, n in zip(prompts, max_tokens):
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            tasks.append(asyncio.create_task(collect(engine.submit(prompt, params))))
            await asyncio.sleep(0.01)  # arrive at different steps
        return await asyncio.gather(*tasks)

    # Without the prefix cache: these prompts share prefixes, which it would skip (tests/server/test_prefix_cache.py).
    results = run_with_engine(tiny, scenario, prefix_cache_bytes=0)
    assert [len(r.token_ids) for r in results] == max_tokens
    prefills = [c for c in calls if c["past"] == 0]
    decodes = [c for c in calls if c["past"] > 0]
    assert len(prefills) + len(decodes) == len(calls)
    assert sum(c["real"] for c in prefills) == sum(len(p) for p in prompts), "each prompt token is fed once"
    assert all(c["queries"] == 1 for c in decodes), "a decode step feeds exactly one token per row"
    # The first token of each request comes from its prefill; each later one from one decode feed.
    assert sum(c["rows"] for c in decodes) == sum(n - 1 for n in max_tokens)
