"""A row's output with a prefix-cache hit, or prefilled in chunks, equals its output without (real model, fp32).

Greedy, token for token. References come from the same engine with the prefix cache off and no chunking.
"""

from __future__ import annotations

import asyncio

import pytest

from models import LoadedModel
from server.engine import Engine
from server.request import SamplingParams
from server.scheduler import Budgets
from tests.helpers import PrefillRecorder, Result, around_forward, collect, generate_together, run_with_engine
from tests.server.test_engine_parity import PASSAGE, QUESTIONS

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are the keeper's assistant at an old lighthouse. Answer briefly and plainly, in one or two sentences, "
    "and never invent facts about the lighthouse that the keeper's logbook does not record. "
) * 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def chat(smol: LoadedModel, question: str, system: str = SYSTEM) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return smol.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def busy_scenario(smol: LoadedModel) -> tuple[list[list[int]], list[list[int]]]:
    """Requests without the system prompt keep the batch busy; those with it join at different steps."""
    busy = [chat(smol, q, system="You are terse.") for q in QUESTIONS[:4]]
    shared = [chat(smol, q) for q in QUESTIONS]
    return busy, shared


async def join_at_steps(engine: Engine, busy: list[list[int]], shared: list[list[int]]) -> list[Result]:
    tasks = [asyncio.create_task(collect(engine.submit(p, greedy(24)))) for p in busy]
    for prompt in shared:
        await _wait_for_steps(engine, engine.steps + 2)
        tasks.append(asyncio.create_task(collect(engine.submit(prompt, greedy(10)))))
    return list(await asyncio.gather(*tasks))


def test_a_shared_system_prompt_joining_a_busy_batch_gives_the_same_answers_with_the_cache(smol: LoadedModel) -> None:
    busy, shared = busy_scenario(smol)
    plain = run_with_engine(smol, lambda e: join_at_steps(e, busy, shared), prefix_cache_bytes=0)
    caches = {}

    async def cached(engine: Engine) -> list[Result]:
        caches["big"] = engine.prefix_cache
        return await join_at_steps(engine, busy, shared)

    with_cache = run_with_engine(smol, cached)
    for index, (got, want) in enumerate(zip(with_cache, plain, strict=True)):
        assert got.token_ids == want.token_ids, f"request {index}"
    reused = [r.events[-1].usage.cached_tokens for r in with_cache[len(busy) :]]
    assert reused[0] == 0 and all(n >= 96 for n in reused[1:]), reused  # the system prompt is 100+ tokens

    # A cache of 12 blocks cannot hold every prompt: blocks are evicted, the bound holds, answers do not change.
    small_block_bytes = caches["big"].block_bytes

    async def small(engine: Engine) -> tuple[list[Result], int, int, int]:
        results = await join_at_steps(engine, busy, shared)
        cache = engine.prefix_cache
        return results, cache.evictions, cache.bytes_used, cache.capacity

    results, evictions, used, capacity = run_with_engine(smol, small, prefix_cache_bytes=12 * small_block_bytes)
    assert capacity == 12 and evictions > 0 and used <= 12 * small_block_bytes
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]


def test_a_long_prompt_prefilled_in_chunks_joins_16_streams_without_changing_anything(smol: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 256
    streams = [chat(smol, q, system="You are terse.") for q in (QUESTIONS * 3)[:16]]
    long_prompt = smol.tokenizer.encode(PASSAGE * 8, add_special_tokens=False)[:1500]
    params = [greedy(12 + i % 4) for i in range(16)]
    undisturbed = generate_together(smol, streams, params)
    alone = run_with_engine(smol, lambda e: collect(e.submit(long_prompt, greedy(8))), prefix_cache_bytes=0)
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=budget, max_waiting=256)
    recorder = PrefillRecorder()
    around_forward(monkeypatch, recorder.record)  # records only once it watches the engine below

    async def scenario(engine: Engine) -> tuple[Result, list[Result]]:
        recorder.watch(engine)
        running = [asyncio.create_task(collect(engine.submit(p, sp))) for p, sp in zip(streams, params)]
        while engine.num_running < len(streams):
            await asyncio.sleep(0.001)
        long_result = await collect(engine.submit(long_prompt, greedy(8)))
        return long_result, [await task for task in running]

    long_result, others = run_with_engine(smol, scenario, budgets=budgets, prefix_cache_bytes=0)
    assert long_result.token_ids == alone.token_ids
    assert [r.token_ids for r in others] == [r.token_ids for r in undisturbed]
    assert max(recorder.prefilled.values()) <= budget, dict(recorder.prefilled)
    assert sum(recorder.prefilled.values()) == len(long_prompt) + sum(len(p) for p in streams)
    assert all(r.events[0].token_ids for r in others), "every stream had its first token"


async def _wait_for_steps(engine: Engine, steps: int) -> None:
    while engine.steps < steps:
        await asyncio.sleep(0.005)
