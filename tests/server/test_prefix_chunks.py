"""Prefix caching and chunked prefill through the engine, on the tiny model: what is computed, per step.

Every forward the real tiny model runs outside a decode step is recorded with the engine step it ran in
(a prefill group or a chunk), and its computed tokens are counted from its position ids.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import torch

from models import LoadedModel
from models.batch import Batch
from models.forward import Forward
from server import metrics
from server.engine import Engine
from server.request import FinishReason, SamplingParams
from server.scheduler import Budgets
from tests.helpers import PrefillRecorder, Result, around_forward, collect, run_with_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def recorder(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> PrefillRecorder:
    recorder = PrefillRecorder()
    around_forward(monkeypatch, recorder.record)
    return recorder


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def one_by_one(tiny: LoadedModel, prompts: list[list[int]], n: int, cache_bytes: int | None, recorder: PrefillRecorder | None = None) -> list[Result]:
    async def scenario(engine: Engine) -> list[Result]:
        if recorder is not None:
            recorder.watch(engine)
        return [await collect(engine.submit(p, greedy(n))) for p in prompts]

    return run_with_engine(tiny, scenario, prefix_cache_bytes=cache_bytes)


def test_a_prompt_that_starts_like_an_earlier_one_computes_only_the_rest(tiny: LoadedModel, recorder: PrefillRecorder) -> None:
    system = [(7 * i) % 500 + 1 for i in range(70)]  # 70 tokens: four whole blocks of 16 are cacheable
    prompts = [system + [11, 12, 13], system + [21, 22], system + [31, 32, 33, 34]]
    plain = one_by_one(tiny, prompts, 6, cache_bytes=0)
    reused_before = metrics.PREFIX_CACHED_TOKENS._value.get()
    cached = one_by_one(tiny, prompts, 6, cache_bytes=None, recorder=recorder)
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]
    reused = [r.events[-1].usage.cached_tokens for r in cached]
    assert reused == [0, 64, 64]
    assert metrics.PREFIX_CACHED_TOKENS._value.get() - reused_before == 128
    assert sum(recorder.prefilled.values()) == sum(len(p) for p in prompts) - 128, "cached tokens are not computed"


def test_a_conversation_reuses_its_earlier_turns_answers_included(tiny: LoadedModel) -> None:
    first = list(range(1, 41))

    async def scenario(engine: Engine) -> tuple[Result, Result]:
        one = await collect(engine.submit(first, greedy(30)))
        two = await collect(engine.submit(first + one.token_ids + [5, 6, 7], greedy(4)))
        return one, two

    _, two = run_with_engine(tiny, scenario)
    # 40 prompt + 29 answer tokens have KV (the last answer token was never fed): 4 whole blocks.
    assert two.events[-1].usage.cached_tokens == 64


def test_no_step_prefills_more_than_the_budget_and_chunked_output_is_unchanged(tiny: LoadedModel, recorder: PrefillRecorder) -> None:
    budget = 64
    streams = [[(13 * i + j) % 500 + 1 for j in range(10 + i)] for i in range(16)]
    long_prompt = [(17 * j) % 500 + 1 for j in range(300)]
    alone = one_by_one(tiny, [long_prompt, *streams], 20, cache_bytes=0)
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=budget, max_waiting=256)

    async def scenario(engine: Engine) -> tuple[Result, list[Result]]:
        recorder.watch(engine)
        running = [asyncio.create_task(collect(engine.submit(p, greedy(20)))) for p in streams]
        while engine.num_running < len(streams):
            await asyncio.sleep(0.001)
        joined_at = engine.steps
        long_result = await collect(engine.submit(long_prompt, greedy(20)))
        assert engine.steps - joined_at >= 300 // budget, "the long prompt took several steps"
        return long_result, [await task for task in running]

    long_result, others = run_with_engine(tiny, scenario, budgets=budgets, prefix_cache_bytes=0)
    assert long_result.token_ids == alone[0].token_ids
    assert [r.token_ids for r in others] == [r.token_ids for r in alone[1:]]
    assert max(recorder.prefilled.values()) <= budget, dict(recorder.prefilled)
    assert sum(recorder.prefilled.values()) == 300 + sum(len(p) for p in streams)


def test_a_chunked_prompt_shorter_than_a_running_row_joins_it(tiny: LoadedModel, recorder: PrefillRecorder) -> None:
    """The running batch is wider than the newcomer: readying room for its join must not shrink the window."""
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=32, max_waiting=256)
    longer = [(17 * j) % 500 + 1 for j in range(200)]
    shorter = [(19 * j) % 500 + 1 for j in range(90)]
    alone = one_by_one(tiny, [longer, shorter], 30, cache_bytes=0)

    async def scenario(engine: Engine) -> list[Result]:
        recorder.watch(engine)
        first = asyncio.create_task(collect(engine.submit(longer, greedy(30))))
        while engine.num_running < 1:
            await asyncio.sleep(0.001)
        return [await collect(engine.submit(shorter, greedy(30))), await first]

    second, first = run_with_engine(tiny, scenario, budgets=budgets, prefix_cache_bytes=0)
    assert first.token_ids == alone[0].token_ids and second.token_ids == alone[1].token_ids
    assert max(recorder.prefilled.values()) <= 32, "both prompts were read in chunks"


def test_a_chunked_prompt_that_its_first_token_ends_never_enters_the_running_batch(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt asking for one token (a classification, a score) ends with its last chunk: its KV is never
    copied into the running batch, nor room made there for it, yet its blocks are cached. One asking for two
    tokens joins, once. Every answer equals its alone answer."""
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=32, max_waiting=256)
    streams = [[(13 * i + j) % 500 + 1 for j in range(10 + i)] for i in range(3)]
    long_prompt, other_prompt = [(17 * j) % 500 + 1 for j in range(150)], [(19 * j) % 500 + 1 for j in range(150)]
    alone = one_by_one(tiny, [long_prompt, other_prompt, *streams], 40, cache_bytes=0)
    calls = {"join": 0, "make_room": 0}
    for name in calls:
        method = getattr(Batch, name)

        def counted(batch: Batch, *args: object, _method=method, _name=name) -> None:
            if batch.keys:  # the running batch: staging batches hold one row and never take these calls
                calls[_name] += 1
            return _method(batch, *args)

        monkeypatch.setattr(Batch, name, counted)

    async def scenario(engine: Engine) -> tuple[list[Result], Result, dict[str, int], Result, Result, dict[str, int]]:
        running = [asyncio.create_task(collect(engine.submit(p, greedy(40)))) for p in streams]
        while engine.num_running < len(streams):
            await asyncio.sleep(0.001)
        settled = engine.steps + 2
        while engine.steps < settled:  # a stream read in chunks joins at its first decode step
            await asyncio.sleep(0.001)
        base = dict(calls)
        one = await collect(engine.submit(long_prompt, greedy(1)))
        after_one = {name: calls[name] - base[name] for name in calls}
        again = await collect(engine.submit(long_prompt, greedy(1)))
        two = await collect(engine.submit(other_prompt, greedy(2)))
        after_two = {name: calls[name] - base[name] for name in calls}
        return [await t for t in running], one, after_one, again, two, after_two

    running, one, after_one, again, two, after_two = run_with_engine(tiny, scenario, budgets=budgets)
    assert [r.token_ids for r in running] == [r.token_ids for r in alone[2:]]
    assert one.token_ids == alone[0].token_ids[:1]
    assert after_one == {"join": 0, "make_room": 0}, "the one-token prompt was never readied for nor joined"
    assert again.events[-1].usage.cached_tokens == 144, "its blocks were cached from its staging batch"
    assert after_two["join"] == 1 and after_two["make_room"] > 0, "a prompt that decodes on joins"
    assert two.token_ids == alone[1].token_ids[:2]


def test_a_chunk_that_breaks_the_model_fails_alone(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk rides in the running rows' decode forward; when that forward fails, the step is taken again
    without the chunk, so only the chunked request fails."""
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=32, max_waiting=256)
    streams = [[(13 * i + j) % 500 + 1 for j in range(10 + i)] for i in range(2)]
    alone = one_by_one(tiny, streams, 30, cache_bytes=0)
    poison = 77
    doomed_prompt = [(17 * j) % 500 + 1 for j in range(100)]
    doomed_prompt[40:44] = [poison] * 4  # in the second chunk, so in a forward with the running rows

    def faulty(inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if (inputs.input_ids == poison).sum() >= 3:  # two running rows cannot make three in one step
            raise RuntimeError("injected forward failure")
        return run()

    around_forward(monkeypatch, faulty)

    async def scenario(engine: Engine) -> tuple[list[Result], Result, Result, int]:
        running = [asyncio.create_task(collect(engine.submit(p, greedy(30)))) for p in streams]
        while engine.num_running < len(streams):
            await asyncio.sleep(0.001)
        doomed = await collect(engine.submit(doomed_prompt, greedy(5)))
        after = await collect(engine.submit(streams[0], greedy(4)))
        return [await t for t in running], doomed, after, len(engine._runner._staging)

    running, doomed, after, staged = run_with_engine(tiny, scenario, budgets=budgets, prefix_cache_bytes=0)
    assert doomed.finish_reason is FinishReason.ERROR and doomed.token_ids == []
    assert [r.token_ids for r in running] == [r.token_ids for r in alone], "the running rows never noticed"
    assert after.token_ids == alone[0].token_ids[:4] and staged == 0


def test_a_prompt_that_breaks_the_step_it_rides_in_fails_alone(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two newcomers ride in one decode step and one of them breaks its forward. Which one is not known, so the
    running rows decode alone and each newcomer is read alone: only the one that breaks fails, and the other
    and the running rows get what they get alone."""
    streams = [[(13 * i + j) % 500 + 1 for j in range(10 + i)] for i in range(2)]
    innocent = [(19 * j) % 500 + 1 for j in range(12)]
    alone = one_by_one(tiny, [*streams, innocent], 20, cache_bytes=0)
    poison = 77
    doomed_prompt = [poison] * 3 + [5, 6, 7]
    queued = threading.Event()  # both newcomers wait in the queue
    failed: list[int] = []  # tokens of each forward that failed

    def faulty(inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if armed:
            queued.wait(10)  # the engine holds its step until both newcomers are queued: they join one step
        if (inputs.input_ids == poison).sum() >= 3:
            failed.append(inputs.input_ids.numel())
            raise RuntimeError("injected forward failure")
        return run()

    armed = False
    around_forward(monkeypatch, faulty)

    async def scenario(engine: Engine) -> tuple[list[Result], Result, Result]:
        nonlocal armed
        running = [asyncio.create_task(collect(engine.submit(p, greedy(20)))) for p in streams]
        while engine.num_running < len(streams):
            await asyncio.sleep(0.001)
        armed = True
        newcomers = [asyncio.create_task(collect(engine.submit(p, greedy(20)))) for p in (doomed_prompt, innocent)]
        while engine.num_waiting < 2:
            await asyncio.sleep(0.001)
        queued.set()
        doomed, fine = [await t for t in newcomers]
        return [await t for t in running], doomed, fine

    running, doomed, fine = run_with_engine(tiny, scenario, prefix_cache_bytes=0)
    assert doomed.finish_reason is FinishReason.ERROR and doomed.token_ids == []
    assert fine.token_ids == alone[2].token_ids and [r.token_ids for r in running] == [r.token_ids for r in alone[:2]]
    # The step that carried both failed, then the doomed prompt alone: 2 decode rows + 6 + 12 tokens, then 6.
    assert failed == [2 + len(doomed_prompt) + len(innocent), len(doomed_prompt)]


def test_cancelling_between_chunks_frees_everything(tiny: LoadedModel, recorder: PrefillRecorder) -> None:
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=32, max_waiting=256)
    long_prompt = [(17 * j) % 500 + 1 for j in range(400)]

    async def scenario(engine: Engine) -> dict[str, object]:
        recorder.watch(engine)
        runner, scheduler = engine._runner, engine._scheduler
        stream = engine.submit(long_prompt, greedy(5), request_id="long")
        reader = asyncio.create_task(collect(stream))
        while recorder.prefill_calls < 2:
            await asyncio.sleep(0.001)
        mid = {"staging": len(runner._staging), "chunking": scheduler.chunking is not None}
        engine.cancel("long")
        result = await reader
        after_steps = engine.steps
        while engine.steps < after_steps + 2:  # let the loop go round once more, idle
            engine._wake.set()
            await asyncio.sleep(0.01)
        freed = {
            "mid": mid, "result": result, "staging": len(runner._staging),
            "chunking": scheduler.chunking, "rows": len(runner.rows), "requests": engine.num_requests,
            "generators": len(runner._generators), "calls": recorder.prefill_calls,
        }  # fmt: skip
        return {**freed, "again": await collect(engine.submit(long_prompt[:20], greedy(3)))}

    outcome = run_with_engine(tiny, scenario, budgets=budgets, prefix_cache_bytes=0)
    assert outcome["mid"] == {"staging": 1, "chunking": True}, "cancelled while its prompt was being read"
    assert outcome["result"].finish_reason.value == "abort" and outcome["result"].token_ids == []
    assert outcome["staging"] == 0 and outcome["chunking"] is None and outcome["rows"] == 0
    assert outcome["requests"] == 0 and outcome["generators"] == 0
    assert outcome["calls"] < 400 // 32, "the rest of the prompt was not read"
    assert len(outcome["again"].token_ids) == 3

