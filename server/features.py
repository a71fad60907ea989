"""Which features combine: one table, read by everything that decides.

Four ways a request can run differently from a plain row: prompt-lookup speculation (several greedy tokens a
step), a beam search (several rows ranked on the model's own scores), prefix reuse (prompt KV copied from the
prefix cache) and chunked prefill (a long prompt read over several steps). Each sampling field says, for each
of them, which of its values may go along: any, or only the ones that change nothing about what that feature
assumes. `allows` answers for a request's parameters; `refusal` names the first field in the way.
tests/server/test_features.py fails when SamplingParams gains a field this table does not rule on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FEATURES = ("speculation", "beam", "prefix_reuse", "chunking")
ANY = None  # every value combines


@dataclass(frozen=True)
class Rule:
    """Per feature, the values of one field that combine with it (ANY: all of them), and why not otherwise."""

    speculation: tuple[Any, ...] | None = ANY
    beam: tuple[Any, ...] | None = ANY
    prefix_reuse: tuple[Any, ...] | None = ANY
    chunking: tuple[Any, ...] | None = ANY
    why: str = ""

    def allows(self, feature: str, value: Any) -> bool:
        allowed = getattr(self, feature)
        # `is` for booleans and None: 0 == False, but a grammar is never 0.
        return allowed is ANY or any(value is a if a is None or isinstance(a, bool) else value == a for a in allowed)


GREEDY = "a speculated row takes the argmax of the raw logits at every drafted position; a beam search ranks them"
RULES: dict[str, Rule] = {
    "max_tokens": Rule(),
    "min_tokens": Rule(),  # until it is reached its suppressed stop tokens keep a row from speculating
    "temperature": Rule(speculation=(0,), beam=(0,), why=GREEDY),
    "top_p": Rule(),  # greedy rows ignore it
    "top_k": Rule(),
    "min_p": Rule(),
    "repetition_penalty": Rule(speculation=(1,), beam=(1,), why="penalties reshape the scores each position depends on"),
    "presence_penalty": Rule(speculation=(0,), beam=(0,), why="penalties reshape the scores each position depends on"),
    "frequency_penalty": Rule(speculation=(0,), beam=(0,), why="penalties reshape the scores each position depends on"),
    "seed": Rule(),
    "stop": Rule(),  # a beam checks each continuation for them
    "stop_token_ids": Rule(),
    "ignore_eos": Rule(),
    "logprobs": Rule(speculation=(None,), why="a verify step scores its draft positions, not one token"),
    "prompt_logprobs": Rule(
        prefix_reuse=(None,), chunking=(None,), why="every prompt position's logits must come from one forward"
    ),
    "grammar": Rule(speculation=(None,), beam=(None,), why="a grammar walks one sequence, one token at a time"),
    "beam_width": Rule(
        speculation=(None,), chunking=(None,), why="a search's rows are forked from one prefilled row, in the batch"
    ),
    "beam_returns": Rule(),
    "length_penalty": Rule(),
    "early_stopping": Rule(),
}


def allows(feature: str, params: Any) -> bool:
    """Whether a request with `params` may run with `feature`."""
    return refusal(feature, params) is None


def refusal(feature: str, params: Any) -> str | None:
    """The first field of `params` whose value `feature` cannot go along with; None when all can."""
    return next((name for name, rule in RULES.items() if not rule.allows(feature, getattr(params, name))), None)


def beam_enum(name: str) -> list[Any] | None:
    """For the API document: the values a beam search admits for `name` (and null), or None for any."""
    allowed = RULES[name].beam
    return None if allowed is ANY else [*allowed, None]
