"""Scheduling decisions with plain numbers: budgets, first come first served, prefill groups."""

from __future__ import annotations

import asyncio

import pytest

from server.detokenizer import Detokenizer
from server.errors import QueueFull
from server.request import Request, SamplingParams, Status, Stream
from server.scheduler import MAX_GROUP_PADDING, Budgets, Scheduler, group_by_length


def request(name: str, prompt_len: int, output_len: int = 0) -> Request:
    loop = asyncio.new_event_loop()
    loop.close()
    return Request(
        id=name,
        prompt_ids=[1] * prompt_len,
        params=SamplingParams(),
        max_tokens=100,
        stop_token_ids=frozenset(),
        stream=Stream(loop, Detokenizer(None)),
        output_ids=[1] * output_len,
    )


def scheduler(**overrides: int) -> Scheduler:
    budgets = {"max_batch_size": 4, "max_batch_tokens": 1000, "max_prefill_tokens": 500, "max_waiting": 8}
    return Scheduler(Budgets(**{**budgets, **overrides}))


def names(requests: list[Request]) -> list[str]:
    return [r.id for r in requests]


def test_first_come_first_served_up_to_the_row_budget() -> None:
    s = scheduler(max_batch_size=2)
    for i in range(3):
        s.add(request(f"r{i}", 10))
    assert names(s.schedule().joining) == ["r0", "r1"]
    assert names(s.waiting) == ["r2"] and all(r.status is Status.RUNNING for r in s.running)
    assert s.schedule().joining == []
    s.running[0].status = Status.FINISHED
    plan = s.schedule()
    assert names(plan.leaving) == ["r0"] and names(plan.joining) == ["r2"]


def test_padded_batch_tokens_are_checked_when_rows_join() -> None:
    s = scheduler(max_batch_tokens=100, max_prefill_tokens=1000)
    s.add(request("a", 30))
    s.add(request("b", 40))  # 2 rows x 40 = 80: fits
    s.add(request("c", 10))  # 3 rows x 40 = 120: does not
    assert names(s.schedule().joining) == ["a", "b"]
    assert s.schedule().joining == []


def test_the_head_of_the_queue_blocks_those_behind_it() -> None:
    s = scheduler(max_batch_tokens=100, max_prefill_tokens=1000)
    s.add(request("running", 20))
    s.schedule()
    s.add(request("huge", 90))  # 2 x 90 = 180 > 100
    s.add(request("small", 5))  # would fit, but must not overtake
    assert s.schedule().joining == []
    s.running[0].status = Status.FINISHED
    assert names(s.schedule().joining) == ["huge"], "alone, a request always runs"


def test_the_prefill_budget_limits_newcomers_per_step() -> None:
    s = scheduler(max_prefill_tokens=50, max_batch_size=8)
    for name, length in (("a", 20), ("b", 15), ("c", 40), ("d", 5), ("e", 30)):
        s.add(request(name, length))
    plan = s.schedule()
    # What is left of the budget (15, at least a quarter of it) starts c's prefill in chunks; d waits behind it.
    assert sorted(names(plan.joining)) == ["a", "b"] and (plan.chunk[0].id, plan.chunk[1]) == ("c", 15)
    plan = s.schedule()
    assert (plan.chunk[0].id, plan.chunk[1]) == ("c", 25) and names(plan.joining) == ["d"]
    # 20 left: e (30) does not fit whole, and one prompt is read in chunks per step, so it waits.
    assert s.chunking is None and names(s.waiting) == ["e"]
    plan = s.schedule()
    assert names(plan.joining) == ["e"] and plan.chunk is None
    assert names(s.running) == ["a", "b", "c", "d", "e"]


def test_a_sliver_of_budget_does_not_start_a_chunk() -> None:
    s = scheduler(max_prefill_tokens=50)
    for name, length in (("a", 45), ("b", 20)):
        s.add(request(name, length))
    plan = s.schedule()
    assert names(plan.joining) == ["a"] and plan.chunk is None, "5 tokens left: b waits for a fresh budget"
    assert names(s.schedule().joining) == ["b"]


def test_a_prompt_over_the_prefill_budget_is_prefilled_in_chunks_one_per_step() -> None:
    s = scheduler(max_prefill_tokens=50)
    s.add(request("running", 10))
    s.schedule()
    s.add(request("long", 120))
    s.add(request("long2", 60))
    chunks = []
    while (plan := s.schedule()).chunk is not None:
        chunks.append((plan.chunk[0].id, plan.chunk[1], sum(len(r.prompt_ids) for r in plan.joining)))
    # No step prefills more than the budget; the second long prompt starts once the first is done.
    assert chunks == [("long", 50, 0), ("long", 50, 0), ("long", 20, 0), ("long2", 50, 0), ("long2", 10, 0)]
    assert names(s.running) == ["running", "long", "long2"] and not s.waiting


def test_a_chunked_prompt_cancelled_between_chunks_leaves() -> None:
    s = scheduler(max_prefill_tokens=50)
    s.add(request("long", 120))
    assert s.schedule().chunk[0].id == "long"
    s.chunking.cancelled = True
    plan = s.schedule()
    assert names(plan.leaving) == ["long"] and plan.chunk is None and not s.has_work


def test_queue_full_fails_fast() -> None:
    s = scheduler(max_waiting=2)
    s.add(request("a", 1))
    s.add(request("b", 1))
    with pytest.raises(QueueFull):
        s.add(request("c", 1))


def test_cancelled_requests_leave_the_queue_and_the_batch() -> None:
    s = scheduler(max_batch_size=1)
    s.add(request("run", 5))
    s.add(request("wait", 5))
    s.schedule()
    s.running[0].cancelled = True
    s.waiting[0].cancelled = True
    plan = s.schedule()
    assert names(plan.leaving) == ["run"] and names(plan.aborted) == ["wait"]
    assert not s.has_work


def test_running_width_counts_generated_tokens() -> None:
    s = scheduler(max_batch_tokens=100, max_prefill_tokens=1000)
    s.add(request("grown", 10))
    s.schedule()
    s.running[0].output_ids.extend([1] * 50)  # now 60 tokens wide
    s.add(request("next", 10))
    assert s.schedule().joining == [], "2 rows x 60 > 100"


def test_newcomers_are_grouped_by_length_with_bounded_padding() -> None:
    requests = [request(f"r{n}", n) for n in (300, 5, 40, 12, 44, 290, 38)]
    groups = group_by_length(requests)
    assert sorted(r.id for g in groups for r in g) == sorted(r.id for r in requests)
    for group in groups:
        lengths = [len(r.prompt_ids) for r in group]
        assert 1 - sum(lengths) / (len(lengths) * max(lengths)) <= MAX_GROUP_PADDING
    assert [[len(r.prompt_ids) for r in g] for g in groups] == [[5], [12], [38, 40, 44], [290, 300]]
