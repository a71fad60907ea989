"""Who runs: the waiting queue, the running set, and the budgets that decide who joins.

Decides with plain numbers (rows, prompt lengths, token counts, prefix-cache block keys) and returns a
plan; turning a plan into tensors is models/'s business. First come, first served: when the request at
the head of the queue does not fit, nobody behind it jumps ahead.

Prompt tokens the prefix cache holds are not prefilled, so admission counts only the rest. A prompt whose
rest exceeds what is left of the step's prefill budget is prefilled in chunks, one per step (one such
prompt at a time), while the running rows keep decoding; it joins the running set with its last chunk.

While rows decode, newcomers ride in the decode step as parts (a mixed batch): each prompt is read whole in
the step's one forward, so the step reads the weights once, not once more per prefill group, and nothing is
padded. Prefill groups are for a step with nothing to decode, and for what cannot ride (server/features.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server import features, speculation
from server.errors import QueueFull
from server.request import Request, Status

# A prefill group stops growing when more than this share of its padded tokens would be padding; the rest
# of the newcomers form further groups. Prompts of mixed lengths padded to the longest can waste half of
# a prefill (DESIGN.md measured 21 s of a 44 s run), while a group of one wastes nothing.
MAX_GROUP_PADDING = 0.2
# A prompt starts its chunks only when at least this share of the step's prefill budget is left: a sliver
# of a chunk would cost a forward (and a step of the prompt's latency) for a handful of tokens.
MIN_FIRST_CHUNK = 0.25


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


class PrefixIndex(Protocol):
    """What the scheduler asks of the prefix cache: plain numbers only."""

    block_tokens: int

    def match(self, keys: Sequence[int]) -> int:
        """How many leading blocks of the chain `keys` are cached."""
        ...


@dataclass
class Plan:
    leaving: list[Request] = field(default_factory=list)  # running (or chunking) rows to drop: finished or cancelled
    aborted: list[Request] = field(default_factory=list)  # cancelled while still waiting
    groups: list[list[Request]] = field(default_factory=list)  # newcomers, as left-padded prefill groups
    # Prompts read in the decode step's forward, and their tokens this step: newcomers whole, and the next
    # chunk of a prompt prefilled in chunks (first, if any).
    parts: list[tuple[Request, int]] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # tokens to verify for the one running row (speculation)

    @property
    def joining(self) -> list[Request]:
        """Newcomers prefilled in groups."""
        return [request for group in self.groups for request in group]


class Scheduler:
    def __init__(self, budgets: Budgets, prefix: PrefixIndex | None = None) -> None:
        self.budgets = budgets
        self.prefix = prefix
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.chunking: Request | None = None  # admitted, prefilled in chunks, not yet running

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunking)

    @property
    def batch_tokens(self) -> int:
        """Rows x padded length of the running batch: what admission holds against `max_batch_tokens`."""
        rows, width = self._held()
        return rows * width

    @property
    def kv_usage(self) -> float:
        """Share of `max_batch_tokens` the running batch holds, at most 1 (a lone prompt longer than the
        budget runs anyway). A gateway reads it as saturation."""
        return min(1.0, self.batch_tokens / self.budgets.max_batch_tokens)

    def _held(self) -> tuple[int, int]:
        """Rows the running batch holds, and its padded length so far."""
        # A beam request holds all its rows from admission on, though it is prefilled as one.
        rows = sum(len(r.rows) for r in self.running) + (self.chunking is not None)
        width = max((r.num_tokens for r in self.running), default=0)
        return rows, width

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
        """This step's plan: who leaves, the next chunk of a prompt read in chunks, and who joins whole.

        Mutates the queue and the running set as if the plan succeeds; a request the engine then fails is
        finished, and leaves at the next step.
        """
        plan = Plan(leaving=self.retire())
        chunking = self.chunking
        if chunking is not None and (chunking.finished or chunking.cancelled):
            plan.leaving.append(chunking)
            self.chunking = None
        if any(r.cancelled for r in self.waiting):
            plan.aborted = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        budget = self.budgets.max_prefill_tokens
        if self.chunking is not None:
            plan.parts.append(self._next_chunk(self.chunking, budget))
            budget -= plan.parts[0][1]
        joining = self._admit(budget, plan.parts)
        plan.groups = group_by_length(joining)
        for group in plan.groups:
            settle_reuse(group)
        plan.draft = self._draft(plan)
        return plan

    def _draft(self, plan: Plan) -> list[int]:
        """Speculate only for a batch of one row with nobody joining, chunking or waiting: left padding wants
        every row's last token in one column, so rows that accept different counts could not share a step,
        and a draft must never delay a newcomer's prefill. One stream alone is where a step's cost is all
        weights, too, so verifying several tokens costs about what decoding one does."""
        if not self.budgets.speculative_tokens or plan.groups or plan.parts or self.chunking or self.waiting:
            return []
        if len(self.running) != 1 or len(self.running[0].rows) != 1:  # a beam search holds several rows
            return []
        return speculation.draft(self.running[0].rows[0], self.budgets.speculative_tokens)

    def _hit(self, request: Request) -> int:
        """Prompt tokens the prefix cache holds for `request` (whole blocks; never its last token)."""
        if self.prefix is None or not features.allows("prefix_reuse", request.params):
            return 0
        return self.prefix.match(request.block_keys) * self.prefix.block_tokens

    def _next_chunk(self, request: Request, budget: int) -> tuple[Request, int]:
        """Plan `request`'s next chunk of at most `budget` tokens; with its last one it joins the running set."""
        tokens = min(budget, len(request.prompt_ids) - request.prefilled)
        request.prefilled += tokens
        if request.prefilled == len(request.prompt_ids):
            if self.chunking is request:
                self.chunking = None
            self.running.append(request)
        return request, tokens

    def _admit(self, budget: int, parts: list[tuple[Request, int]]) -> list[Request]:
        """Newcomers that join whole this step in prefill groups; those that ride in the decode step, whole or
        as a first chunk, are appended to `parts`."""
        budgets = self.budgets
        rows, width = self._held()
        decodes = bool(rows or parts)  # the step has a forward that newcomers can ride in
        joining: list[Request] = []
        admitted: list[Request] = []  # from the head of the queue, in order
        for request in self.waiting:
            new_rows = rows + sum(len(r.rows) for r in admitted) + len(request.rows)
            width = max(width, len(request.prompt_ids))
            if new_rows > budgets.max_batch_size:
                break
            # The first newcomer of a step always passes the token budget when nothing else runs: otherwise
            # a long prompt could wait forever.
            if (rows or admitted) and new_rows * width > budgets.max_batch_tokens:
                break
            hit = self._hit(request)
            request.cached_tokens = hit
            rest = len(request.prompt_ids) - hit
            rides = features.allows("chunking", request.params)
            last = False  # nobody behind it joins this step
            if rest <= budget and rides and decodes:
                request.prefilled = hit
                parts.append(self._next_chunk(request, rest))  # whole: it runs from this step on
                budget -= rest
            elif rest <= budget:
                joining.append(request)
                budget -= rest
            elif rides and self.chunking is None:
                if budget < max(1, MIN_FIRST_CHUNK * budgets.max_prefill_tokens):
                    break
                request.prefilled = hit
                self.chunking = request
                parts.append(self._next_chunk(request, budget))
                last = True
            elif not joining and not parts:
                # What cannot be chunked (server/features.py) still runs whole when it comes alone.
                joining.append(request)
                last = True
            else:
                break
            admitted.append(request)
            if last:
                break
        for _ in admitted:
            self.waiting.popleft().status = Status.RUNNING
        self.running.extend(joining)
        return joining


def settle_reuse(group: list[Request]) -> None:
    """Set how many cached prompt tokens each member of a prefill group really reuses.

    NOTE: the group computes its last q = max(prompt - hit) columns, and a row that reuses cached KV must
    compute exactly those q columns (models/batch.py: a pad inside them would overwrite its cached tokens),
    so it reuses prompt - q tokens: at most its hit, since q >= prompt - hit; rows shorter than q reuse none.
    """
    q = max(len(r.prompt_ids) - r.cached_tokens for r in group)
    for request in group:
        request.cached_tokens = max(0, len(request.prompt_ids) - q)


def group_by_length(requests: list[Request]) -> list[list[Request]]:
    """Split newcomers into prefill groups of similar prompt length, each at most MAX_GROUP_PADDING padding.

    Requests that want their prompt scored are grouped apart: scoring needs every position's logits, and
    the others should neither pay for that projection nor have their logits computed another way.
    """
    scored = [r for r in requests if r.params.prompt_logprobs is not None]
    plain = [r for r in requests if r.params.prompt_logprobs is None]
    return _by_length(plain) + _by_length(scored)


def _by_length(requests: list[Request]) -> list[list[Request]]:
    # Grouped by what each computes: its prompt less the tokens the prefix cache holds.
    groups: list[list[Request]] = []
    real = 0
    for request in sorted(requests, key=lambda r: len(r.prompt_ids) - r.cached_tokens):
        length = len(request.prompt_ids) - request.cached_tokens  # the longest so far, as the list is sorted
        if groups and 1 - (real + length) / ((len(groups[-1]) + 1) * length) <= MAX_GROUP_PADDING:
            groups[-1].append(request)
            real += length
        else:
            groups.append([request])
            real = length
    return groups
