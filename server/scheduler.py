"""Who runs: the waiting queue, the running set, and the budgets that decide who joins.

Decides with plain numbers (rows, prompt lengths, token counts) and returns a plan; turning a plan into
tensors is models/'s business. First come, first served: when the request at the head of the queue does
not fit, nobody behind it jumps ahead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server import speculation
from server.errors import QueueFull
from server.request import Request, Status

# A prefill group stops growing when more than this share of its padded tokens would be padding; the rest
# of the newcomers form further groups. Prompts of mixed lengths padded to the longest can waste half of
# a prefill (DESIGN.md measured 21 s of a 44 s run), while a group of one wastes nothing.
MAX_GROUP_PADDING = 0.2


@dataclass(frozen=True)
class Budgets:
    max_batch_size: int  # running rows
    max_batch_tokens: int  # rows x padded length of the running batch, checked when rows join
    max_prefill_tokens: int  # prompt tokens prefilled in one step
    max_waiting: int  # requests queued and not yet running; past it, submit fails fast
    speculative_tokens: int = 0  # prompt-lookup tokens a lone greedy row may verify in one step; 0: never

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_prefill_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.speculative_tokens < 0:
            raise ValueError("speculative_tokens must not be negative")


@dataclass
class Plan:
    leaving: list[Request] = field(default_factory=list)  # running rows to drop: finished or cancelled
    aborted: list[Request] = field(default_factory=list)  # cancelled while still waiting
    groups: list[list[Request]] = field(default_factory=list)  # newcomers, as left-padded prefill groups
    draft: list[int] = field(default_factory=list)  # tokens to verify for the one running row (speculation)

    @property
    def joining(self) -> list[Request]:
        return [request for group in self.groups for request in group]


class Scheduler:
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request, or raise QueueFull when `max_waiting` requests already wait."""
        if len(self.waiting) >= self.budgets.max_waiting:
            raise QueueFull(f"too many requests waiting ({self.budgets.max_waiting}); retry later")
        self.waiting.append(request)

    def retire(self) -> list[Request]:
        """Remove finished and cancelled rows from the running set and return them."""
        leaving = [r for r in self.running if r.finished or r.cancelled]
        if leaving:
            self.running = [r for r in self.running if not (r.finished or r.cancelled)]
        return leaving

    def schedule(self) -> Plan:
        plan = Plan(leaving=self.retire())
        if any(r.cancelled for r in self.waiting):
            plan.aborted = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        plan.groups = group_by_length(self._admit())
        plan.draft = self._draft(plan)
        return plan

    def _draft(self, plan: Plan) -> list[int]:
        """Speculate only for a batch of one row with nobody joining or waiting: left padding wants every row's
        last token in one column, so rows that accept different counts could not share a step, and a draft
        must never delay a newcomer's prefill. One stream alone is where a step's cost is all weights, too,
        so verifying several tokens costs about what decoding one does."""
        if not self.budgets.speculative_tokens or plan.groups or self.waiting:
            return []
        if len(self.running) != 1 or self.running[0].rows != 1:  # a beam search holds several rows
            return []
        return speculation.draft(self.running[0], self.budgets.speculative_tokens)

    def _admit(self) -> list[Request]:
        budgets = self.budgets
        # A beam request holds all its rows from admission on (request.rows), though it is prefilled as one.
        rows = sum(r.rows for r in self.running)
        width = max((r.num_tokens for r in self.running), default=0)
        joining: list[Request] = []
        prefill_tokens = 0
        for request in self.waiting:
            new_rows = rows + sum(r.rows for r in joining) + request.rows
            width = max(width, len(request.prompt_ids))
            prefill_tokens += len(request.prompt_ids)
            if new_rows > budgets.max_batch_size:
                break
            # The first newcomer of a step always passes the token budgets when nothing else runs, and the
            # prefill budget even when something does: otherwise a long prompt could wait forever.
            if (rows or joining) and new_rows * width > budgets.max_batch_tokens:
                break
            if joining and prefill_tokens > budgets.max_prefill_tokens:
                break
            joining.append(request)
        for request in joining:
            self.waiting.popleft()
            request.status = Status.RUNNING
        self.running.extend(joining)
        return joining


def group_by_length(requests: list[Request]) -> list[list[Request]]:
    """Split newcomers into prefill groups of similar prompt length, each at most MAX_GROUP_PADDING padding.

    Requests that want their prompt scored are grouped apart: scoring needs every position's logits, and
    the others should neither pay for that projection nor have their logits computed another way.
    """
    scored = [r for r in requests if r.params.prompt_logprobs is not None]
    plain = [r for r in requests if r.params.prompt_logprobs is None]
    return _by_length(plain) + _by_length(scored)


def _by_length(requests: list[Request]) -> list[list[Request]]:
    groups: list[list[Request]] = []
    real = 0
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        length = len(request.prompt_ids)  # the longest so far, as the list is sorted
        if groups and 1 - (real + length) / ((len(groups[-1]) + 1) * length) <= MAX_GROUP_PADDING:
            groups[-1].append(request)
            real += length
        else:
            groups.append([request])
            real = length
    return groups
