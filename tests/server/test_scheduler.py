"""Scheduling decisions with plain numbers: budgets, first come first served, prefill groups, parts read in the
decode step."""

from __future__ import annotations

import asyncio

import pytest

from server.detokenizer import Detokenizer
from server.errors import QueueFull
from server.request import Request, SamplingParams, Status, Stream
from server.scheduler import MAX_GROUP_PADDING, Budgets, Plan, Scheduler, group_by_length


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


def parts(plan: Plan) -> list[tuple[str, int]]:
    """The prompts the plan reads in its decode step, and their tokens."""
    return [(r.id, tokens) for r, tokens in plan.parts]


def test_first_come_first_served_up_to_the_row_budget() -> None:
    s = scheduler(max_batch_size=2)
    for i in range(3):
        s.add(request(f"r{i}", 10))
    assert names(s.schedule().joining) == ["r0", "r1"]
    assert names(s.waiting) == ["r2"] and all(r.status is Status.RUNNING for r in s.running)
    plan = s.schedule()
    assert plan.joining == [] and plan.parts == []
    s.running[0].status = Status.FINISHED
    plan = s.schedule()
    # r1 still decodes, so r2 is not prefilled apart: its whole prompt is read in the decode step.
    assert names(plan.leaving) == ["r0"] and plan.joining == [] and parts(plan) == [("r2", 10)]
    assert names(s.running) == ["r1", "r2"] and s.chunking is None


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
    plan = s.schedule()
    assert plan.joining == [] and plan.parts == []
    s.running[0].status = Status.FINISHED
    assert names(s.schedule().joining) == ["huge"], "alone, a request always runs"


def test_the_prefill_budget_limits_newcomers_per_step() -> None:
    s = scheduler(max_prefill_tokens=50, max_batch_size=8)
    for name, length in (("a", 20), ("b", 15), ("c", 40), ("d", 5), ("e", 30)):
        s.add(request(name, length))
    plan = s.schedule()
    # What is left of the budget (15, at least a quarter of it) starts c's prefill in chunks; d waits behind it.
    assert sorted(names(plan.joining)) == ["a", "b"] and parts(plan) == [("c", 15)]
    plan = s.schedule()
    # c's last chunk, d whole, and with the 20 tokens left (c is read, so another prompt may start its
    # chunks) e's first chunk: all in the decode step.
    assert plan.joining == [] and parts(plan) == [("c", 25), ("d", 5), ("e", 20)]
    assert s.chunking is not None and s.chunking.id == "e" and not s.waiting
    plan = s.schedule()
    assert parts(plan) == [("e", 10)] and s.chunking is None
    assert names(s.running) == ["a", "b", "c", "d", "e"]


def test_a_sliver_of_budget_does_not_start_a_chunk() -> None:
    s = scheduler(max_prefill_tokens=50)
    for name, length in (("a", 45), ("b", 20)):
        s.add(request(name, length))
    plan = s.schedule()
    assert names(plan.joining) == ["a"] and plan.parts == [], "5 tokens left: b waits for a fresh budget"
    assert parts(s.schedule()) == [("b", 20)]


def test_a_prompt_over_the_prefill_budget_is_prefilled_in_chunks_one_per_step() -> None:
    s = scheduler(max_prefill_tokens=50)
    s.add(request("running", 10))
    s.schedule()
    s.add(request("long", 120))
    s.add(request("long2", 60))
    steps = []
    while (plan := s.schedule()).parts:
        assert plan.joining == []
        steps.append(parts(plan))
    # No step reads more than the budget; the second long prompt starts in the step that reads the first's end.
    assert steps == [[("long", 50)], [("long", 50)], [("long", 20), ("long2", 30)], [("long2", 30)]]
    assert names(s.running) == ["running", "long", "long2"] and not s.waiting


def test_a_chunked_prompt_cancelled_between_chunks_leaves() -> None:
    s = scheduler(max_prefill_tokens=50)
    s.add(request("long", 120))
    assert parts(s.schedule()) == [("long", 50)]
    s.chunking.cancelled = True
    plan = s.schedule()
    assert names(plan.leaving) == ["long"] and plan.parts == [] and not s.has_work


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
    plan = s.schedule()
    assert plan.joining == [] and plan.parts == [], "2 rows x 60 > 100"


def test_newcomers_are_grouped_by_length_with_bounded_padding() -> None:
    requests = [request(f"r{n}", n) for n in (300, 5, 40, 12, 44, 290, 38)]
    groups = group_by_length(requests)
    assert sorted(r.id for g in groups for r in g) == sorted(r.id for r in requests)
    for group in groups:
        lengths = [len(r.prompt_ids) for r in group]
        assert 1 - sum(lengths) / (len(lengths) * max(lengths)) <= MAX_GROUP_PADDING
    assert [[len(r.prompt_ids) for r in g] for g in groups] == [[5], [12], [38, 40, 44], [290, 300]]


def test_while_rows_decode_newcomers_ride_in_the_step_unless_they_cannot() -> None:
    """A prompt that wants its own positions scored cannot be read in a decode step (server/features.py): it is
    prefilled in a group of its own, while the plain newcomers around it ride."""
    s = scheduler(max_batch_size=8)
    s.add(request("running", 10))
    assert names(s.schedule().joining) == ["running"]
    s.add(request("a", 12))
    scored = request("scored", 7)
    scored.params = SamplingParams(prompt_logprobs=1)
    s.add(scored)
    s.add(request("b", 30))
    plan = s.schedule()
    assert names(plan.joining) == ["scored"] and parts(plan) == [("a", 12), ("b", 30)]
    assert sorted(names(s.running)) == ["a", "b", "running", "scored"] and not s.waiting
    riders = [r for r in s.running if r.id in ("a", "b")]
    assert all(r.status is Status.RUNNING and r.prefilled == len(r.prompt_ids) for r in riders)
