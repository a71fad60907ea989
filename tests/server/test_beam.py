"""Beam search's bookkeeping on the tiny model: rows reserved at admission, released on every way out."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import REGISTRY

from models import LoadedModel
from server.beam import BeamSearch
from server.detokenizer import Detokenizer
from server.engine import Engine
from server.request import FinishReason, Request, SamplingParams, Stream
from server.scheduler import Budgets, Scheduler
from tests.helpers import collect, run_with_engine


def beam(width: int, returns: int = 1, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=kwargs.pop("max_tokens", 12), temperature=0.0, beam_width=width, beam_returns=returns, **kwargs)


def request(name: str, params: SamplingParams) -> Request:
    loop = asyncio.new_event_loop()
    loop.close()
    r = Request(
        id=name, prompt_ids=[1] * 4, params=params, max_tokens=10, stop_token_ids=frozenset(), stream=Stream(loop, Detokenizer(None))
    )
    if params.beam_width is not None:
        r.begin_search(BeamSearch(r))
    return r


def test_a_beam_request_counts_its_rows_at_admission() -> None:
    scheduler = Scheduler(Budgets(max_batch_size=5, max_batch_tokens=1000, max_prefill_tokens=500, max_waiting=8))
    for name, params in (("a", beam(3)), ("b", SamplingParams()), ("c", beam(2)), ("d", SamplingParams())):
        scheduler.add(request(name, params))
    assert [r.id for r in scheduler.schedule().joining] == ["a", "b"]  # 3 + 1 rows; c's 2 more would make 6
    assert sum(len(r.rows) for r in scheduler.running) == 4


def test_the_returned_sequences_are_sorted_and_counted(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine):
        return await collect(engine.submit([5, 6, 7, 8], beam(4, 3, logprobs=2)))

    result = run_with_engine(tiny, scenario)
    final = result.events[-1]
    assert len(final.beams) == 3
    scores = [b.score for b in final.beams]
    assert scores == sorted(scores, reverse=True)
    for b in final.beams:
        assert len(b.logprobs) == len(b.token_ids) and all(len(s.logprobs.top) == 2 for s in b.logprobs)
        # length_penalty 1: the score is the mean of the token log-probabilities
        assert abs(b.score - sum(s.logprobs.logprob for s in b.logprobs) / len(b.token_ids)) < 1e-5
    assert final.usage.completion_tokens == sum(len(b.token_ids) for b in final.beams)


def test_stop_strings_end_a_hypothesis_like_a_stop_token(tiny: LoadedModel) -> None:
    prompt = [5, 6, 7, 8]

    async def scenario(engine: Engine):
        free = await collect(engine.submit(prompt, beam(2, 2)))
        text = free.events[-1].beams[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        # length_penalty 0 scores the plain sum: a hypothesis that a stop string ends early ranks high.
        stopped = await collect(engine.submit(prompt, beam(2, 2, stop=[stop], length_penalty=0.0)))
        return stop, stopped.events[-1].beams

    stop, beams = run_with_engine(tiny, scenario)
    assert stop.strip() and any(b.finish_reason is FinishReason.STOP for b in beams)
    for b in beams:
        assert stop not in b.text
        if b.finish_reason is FinishReason.STOP:
            assert stop in tiny.tokenizer.decode(list(b.token_ids), skip_special_tokens=True)


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_storm_of_cancelled_and_abandoned_beam_searches_leaves_no_rows(tiny: LoadedModel) -> None:
    rng = random.Random(7)
    budgets = Budgets(max_batch_size=12, max_batch_tokens=65536, max_prefill_tokens=8192, max_waiting=256)

    async def one(engine: Engine, i: int) -> FinishReason | None:
        params = beam(rng.choice((2, 3, 4)), max_tokens=rng.randint(30, 100)) if i % 4 else SamplingParams(max_tokens=30)
        stream = engine.submit([rng.randrange(1, 200) for _ in range(rng.randint(2, 30))], params, request_id=f"r{i}")
        reader = asyncio.create_task(collect(stream))
        await asyncio.sleep(rng.random() * 0.3)
        if i % 3 == 0:
            engine.cancel(f"r{i}")  # an explicit cancel: the stream still ends with its final event
            return (await reader).finish_reason
        reader.cancel()  # a client that hangs up: its reader is cancelled mid-stream
        return None

    async def scenario(engine: Engine):
        reasons = await asyncio.gather(*(one(engine, i) for i in range(40)))
        for _ in range(200):
            if engine.num_requests == 0 and not engine._runner.rows:
                break
            await asyncio.sleep(0.05)
        return reasons, engine.num_requests, engine.num_waiting, len(engine._runner.rows)

    reasons, tracked, waiting, rows = run_with_engine(tiny, scenario, budgets)
    assert (tracked, waiting, rows) == (0, 0, 0)
    assert FinishReason.ABORT in reasons
    assert gauge("tokenferry_running_requests") == 0
    assert gauge("tokenferry_waiting_requests") == 0
