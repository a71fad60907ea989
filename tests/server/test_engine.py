"""Engine behaviour on the tiny model: bad input, cancellation, faults, draining, stop conditions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from models import LoadedModel
from models.forward import Forward
from server.detokenizer import Detokenizer
from server.engine import Engine
from server.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, QueueFull
from server.request import FinishReason, SamplingParams
from server.scheduler import Budgets
from tests.helpers import around_forward, collect, generate_alone, run_with_engine

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18, 19, 20]]


def greedy(max_tokens: int = 16, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple(str(i) for i in range(17))}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_parameters_name_themselves(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and param in info.value.message


def test_bad_prompts_are_refused_at_submit_and_the_engine_stays_healthy(tiny: LoadedModel) -> None:
    context = tiny.info.context_length

    async def scenario(engine: Engine) -> list[object]:
        cases = [
            ([], greedy(), InvalidRequest, "prompt"),
            ([1, 2, tiny.info.vocab_size], greedy(), InvalidRequest, "prompt"),
            ([1, -1], greedy(), InvalidRequest, "prompt"),
            ([1] * context, greedy(), ContextLengthExceeded, "prompt"),
            ([1] * (context - 10), greedy(max_tokens=11), ContextLengthExceeded, "max_tokens"),
            ([1, 2], greedy(stop_token_ids=(tiny.info.vocab_size,)), InvalidRequest, "stop_token_ids"),
        ]
        for prompt, params, error, param in cases:
            with pytest.raises(error) as info:
                engine.submit(prompt, params)
            assert info.value.param == param
        assert engine.num_requests == 0
        fits = await collect(engine.submit([1] * (context - 10), greedy(max_tokens=10)))
        default = await collect(engine.submit([1] * (context - 3), SamplingParams(temperature=0, ignore_eos=True)))
        return [fits, default]

    fits, default = run_with_engine(tiny, scenario)
    assert len(fits.token_ids) == 10 and fits.finish_reason is FinishReason.LENGTH
    assert len(default.token_ids) == 3, "without max_tokens a request runs to the end of the context"


def test_a_full_queue_fails_fast_and_loses_nothing(tiny: LoadedModel) -> None:
    budgets = Budgets(max_batch_size=1, max_batch_tokens=4096, max_prefill_tokens=4096, max_waiting=2)

    async def scenario(engine: Engine) -> tuple[int, list]:
        streams, refused = [], 0
        for _ in range(6):  # at most one runs and two wait, whenever the engine thread looks
            try:
                streams.append(engine.submit([1, 2, 3], greedy(max_tokens=8)))
            except QueueFull:
                refused += 1
        results = await asyncio.gather(*(collect(s) for s in streams))
        return refused, results

    refused, results = run_with_engine(tiny, scenario, budgets)
    assert refused >= 3 and len(results) == 6 - refused
    assert all(len(r.token_ids) == 8 for r in results)


def test_cancel_frees_the_row_within_one_step(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine) -> dict[str, object]:
        dropped_at = []  # engine steps done when the victim's row left the batch (the loop thread's clock)
        drop = engine._runner.drop

        def watched(rows: list) -> None:
            if any(row.request.id == "victim" for row in rows):
                dropped_at.append(engine.steps)
            drop(rows)

        engine._runner.drop = watched
        keep = asyncio.create_task(collect(engine.submit(PROMPTS[0], greedy(max_tokens=200))))
        stream = engine.submit(PROMPTS[1], greedy(max_tokens=200), request_id="victim")
        await anext(stream)
        while engine.num_running < 2:
            await asyncio.sleep(0)
        steps_at_cancel = engine.steps
        engine.cancel("victim")
        events = [event async for event in stream]
        running_after = engine.num_running
        result = await keep
        return {"last": events[-1], "freed_after": dropped_at[0] - steps_at_cancel, "running": running_after, "keep": result}

    outcome = run_with_engine(tiny, scenario)
    assert outcome["last"].finish_reason is FinishReason.ABORT
    # The step in flight at the cancel finishes; the next one drops the row (one more if a step ended
    # between reading the counter and cancelling). Counted on the loop thread, so a slow reader cannot skew it.
    assert outcome["freed_after"] <= 2, "the row leaves at the start of the next step"
    assert outcome["running"] == 1
    assert len(outcome["keep"].token_ids) == 200


def test_closing_the_stream_cancels_the_request(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine) -> int:
        stream = engine.submit(PROMPTS[2], greedy(max_tokens=500))
        await anext(stream)
        await stream.aclose()
        while engine.num_requests:
            await asyncio.sleep(0.001)
        return engine.num_running

    assert run_with_engine(tiny, scenario) == 0


def test_a_request_failing_inside_the_loop_fails_alone(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = generate_alone(tiny, PROMPTS, [greedy()] * len(PROMPTS))
    push = Detokenizer.push

    def faulty(self: Detokenizer, token_id: int) -> str:
        if self._stop == ("boom",) and len(self._ids) >= 3:
            raise RuntimeError("injected fault")
        return push(self, token_id)

    monkeypatch.setattr(Detokenizer, "push", faulty)

    async def scenario(engine: Engine) -> list:
        streams = [engine.submit(p, greedy()) for p in PROMPTS]
        streams.insert(2, engine.submit([30, 31, 32], greedy(stop=("boom",))))
        return await asyncio.gather(*(collect(s) for s in streams))

    results = run_with_engine(tiny, scenario)
    failed = results.pop(2)
    assert failed.finish_reason is FinishReason.ERROR and failed.error and "injected" not in failed.error
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]


def test_a_failed_prefill_fails_only_its_newcomers(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = generate_alone(tiny, PROMPTS[:2], [greedy(max_tokens=40)] * 2)
    poison = 77

    def faulty(inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if (inputs.input_ids == poison).any():
            raise RuntimeError("injected forward failure")
        return run()

    around_forward(monkeypatch, faulty)

    async def scenario(engine: Engine) -> tuple:
        running = [asyncio.create_task(collect(engine.submit(p, greedy(max_tokens=40)))) for p in PROMPTS[:2]]
        while engine.steps < 5:
            await asyncio.sleep(0.001)
        doomed = await collect(engine.submit([poison, 1, 2], greedy()))
        after = await collect(engine.submit(PROMPTS[2], greedy(max_tokens=4)))
        return [await t for t in running], doomed, after

    running, doomed, after = run_with_engine(tiny, scenario)
    assert doomed.finish_reason is FinishReason.ERROR and doomed.token_ids == []
    assert [r.token_ids for r in running] == [r.token_ids for r in alone]
    assert len(after.token_ids) == 4


def test_drain_finishes_what_runs_and_refuses_newcomers(tiny: LoadedModel) -> None:
    async def main() -> tuple:
        engine = Engine(tiny, Budgets(max_batch_size=2, max_batch_tokens=4096, max_prefill_tokens=4096, max_waiting=8))
        engine.start()
        tasks = [asyncio.create_task(collect(engine.submit(p, greedy(max_tokens=30)))) for p in PROMPTS]
        await asyncio.sleep(0)
        shutdown = asyncio.create_task(engine.shutdown(drain=True, timeout=60))
        await asyncio.sleep(0)
        with pytest.raises(EngineUnavailable):
            engine.submit(PROMPTS[0], greedy())
        await shutdown
        return [await t for t in tasks], engine.alive

    results, alive = asyncio.run(main())
    assert all(len(r.token_ids) == 30 for r in results) and not alive


def test_shutdown_without_drain_aborts(tiny: LoadedModel) -> None:
    async def main() -> list:
        engine = Engine(tiny, Budgets(max_batch_size=2, max_batch_tokens=4096, max_prefill_tokens=4096, max_waiting=8))
        engine.start()
        tasks = [asyncio.create_task(collect(engine.submit(p, greedy(max_tokens=1000)))) for p in PROMPTS]
        await asyncio.sleep(0.05)
        await engine.shutdown(drain=False)
        return [await t for t in tasks]

    assert all(r.finish_reason is FinishReason.ABORT for r in asyncio.run(main()))


def test_stop_tokens_min_tokens_and_usage(tiny: LoadedModel) -> None:
    probe = generate_alone(tiny, [PROMPTS[0]], [greedy(max_tokens=12)])[0]
    stop_token = probe.token_ids[5]
    first = probe.token_ids.index(stop_token)

    async def scenario(engine: Engine) -> list:
        return [
            await collect(engine.submit(PROMPTS[0], greedy(max_tokens=12, stop_token_ids=(stop_token,)))),
            await collect(engine.submit(PROMPTS[0], greedy(max_tokens=12, stop_token_ids=(stop_token,), min_tokens=first + 2))),
        ]

    stopped, held = run_with_engine(tiny, scenario)
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == probe.token_ids[: first + 1]
    assert stopped.text == tiny.tokenizer.decode(probe.token_ids[:first]), "a stop token's text is not shown"
    usage = stopped.events[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, first + 1, first + 5)
    assert len(held.token_ids) >= first + 2 and stop_token not in held.token_ids[: first + 2]


def test_streamed_text_adds_up_to_the_decoded_tokens(tiny: LoadedModel) -> None:
    async def scenario(engine: Engine) -> list:
        return await asyncio.gather(*(collect(engine.submit(p, greedy(max_tokens=40))) for p in PROMPTS))

    for result in run_with_engine(tiny, scenario):
        assert result.text == tiny.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert sum(len(e.token_ids) for e in result.events) == 40
