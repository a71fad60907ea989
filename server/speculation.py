"""Prompt-lookup speculation: draft the next tokens of a greedy row from its own prompt and output.

No draft model (SmolLM2-135M is already the smallest): when the row's last n tokens occurred before, the
tokens that followed them then are proposed as what follows now. Summaries, edits and extractions copy long
runs from their prompt, so drafts are often right there, and an open question simply gets no draft. The
runner checks a draft in one forward over the row's last token and the draft (models/runner.py `verify`)
and keeps the longest prefix greedy decoding agrees with, plus the model's own next token, so the output is
the greedy output, only produced several tokens per step.

Plain numbers only: the scheduler asks `draft` for a plan, the engine thread is the only caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from server import features

MAX_NGRAM = 3  # the longest tail looked up; a longer match is a better predictor, tried first
# A single repeated token predicts little (measured: drafts from 1-token matches were mostly rejected, and a
# rejected draft still costs a wider forward); two tokens are the shortest tail worth a draft.
MIN_NGRAM = 2
# Only the latest tokens are searched: the scan is pure Python and runs once per step.
SEARCH_WINDOW = 4096


class Speculable(Protocol):
    """What speculation reads of a row (server/row.py)."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    max_tokens: int

    @property
    def params(self) -> Any: ...

    def suppressed_token_ids(self) -> frozenset[int]: ...


def eligible(request: Speculable) -> bool:
    """A row whose next tokens are the argmax of the raw logits, whatever came before: plain greedy.

    Which parameters allow it is server/features.py's to say (penalties, a grammar or scores would make each
    drafted position's choice depend on state the single verify forward does not track; a beam search ranks
    candidates instead of taking the argmax). Suppressed tokens (min_tokens not yet reached) are the row's
    state, checked here, as is its first token, which is the prefill's.
    """
    return features.allows("speculation", request.params) and not request.suppressed_token_ids() and bool(request.output_ids)


def propose(tokens: Sequence[int], k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest matching tail of `tokens`."""
    if k <= 0:
        return []
    recent = list(tokens[-SEARCH_WINDOW:])
    size = len(recent)
    # Earlier positions holding the last token, latest first (the nearest context is the likeliest to go on
    # the same way); each is the end of a candidate occurrence of the tail.
    ends = [i for i in range(size - 2, -1, -1) if recent[i] == recent[-1]]
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        tail = recent[size - n :]
        for end in ends:
            if end + 1 >= n and recent[end + 1 - n : end + 1] == tail:
                return recent[end + 1 : end + 1 + k]
    return []


def draft(request: Speculable, k: int) -> list[int]:
    """The draft for one row: at most `k` tokens, and never more than its max_tokens leaves room to keep
    (a verify step keeps the accepted draft plus one token of the model's own)."""
    room = request.max_tokens - len(request.output_ids) - 1
    if room <= 0 or not eligible(request):
        return []
    return propose([*request.prompt_ids, *request.output_ids], min(k, room))
