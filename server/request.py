"""One generation request: its prompt, its parameters and its progress as the engine tracks them, its rows
in the batch, and its stream (what turns its tokens into events, and where they go)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any

from models.types import TokenLogprobs
from server import features
from server.detokenizer import Detokenizer
from server.errors import InvalidRequest, require
from server.row import Row

if TYPE_CHECKING:
    from server.beam import BeamSearch
    from server.grammars import Grammar, GrammarState

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency, as OpenAI defines them
MAX_LOGPROBS = 20  # most top entries per position, as OpenAI's top_logprobs


class FinishReason(StrEnum):
    STOP = "stop"  # an end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_tokens, or the end of the model's context
    ABORT = "abort"  # cancelled by the client or by a shutdown
    ERROR = "error"  # failed inside the engine


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate; validated on construction, each error naming its parameter."""

    max_tokens: int | None = None  # None: up to the end of the context
    min_tokens: int = 0
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no scores; k: each output token's raw logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for the prompt's tokens; with it, max_tokens may be 0
    grammar: Grammar | None = None  # structured output: compiled (server/structured.py), shared by its requests
    # Beam search, as transformers' generate(num_beams=beam_width): None samples one sequence instead.
    beam_width: int | None = None
    beam_returns: int = 1  # finished sequences returned, best first
    length_penalty: float = 1.0  # a sequence's score: its logprob sum / its length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as transformers

    @classmethod
    def given(cls, **values: Any) -> SamplingParams:
        """The parameters an API body gave; a field it left out (None) keeps its default."""
        return cls(**{name: value for name, value in values.items() if value is not None})

    def __post_init__(self) -> None:
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # 0 new tokens only makes sense when the prompt itself is what the caller wants scored.
        least = 0 if self.prompt_logprobs is not None else 1
        require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= least),
            "max_tokens",
            f"must be a positive integer, got {self.max_tokens!r}",
        )
        require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be a non-negative integer")
        require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must not exceed max_tokens ({self.max_tokens})",
        )
        require(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature!r}",
        )
        require(
            _is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}"
        )
        require(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be -1, 0 or positive, got {self.top_k!r}")
        require(
            _is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}"
        )
        require(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be a finite number > 0, got {self.repetition_penalty!r}",
        )
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(_is_number(value) and low <= value <= high, name, f"must be in [{low}, {high}], got {value!r}")
        require(
            self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
            "seed",
            "must be a 64-bit integer",
        )
        require(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for text in self.stop:
            require(
                isinstance(text, str) and 0 < len(text) <= MAX_STOP_STRING_CHARS,
                "stop",
                f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters",
            )
        for token in self.stop_token_ids:
            require(_is_int(token) and token >= 0, "stop_token_ids", "must be non-negative integers")
        require(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        self._check_beam()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            require(
                value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}",
            )


    def _check_beam(self) -> None:
        if self.beam_width is None:
            return
        require(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", "must be a positive integer")
        require(
            _is_int(self.beam_returns) and 1 <= self.beam_returns <= self.beam_width,
            "beam_returns",
            f"must be in [1, beam_width ({self.beam_width})]",
        )
        require(_is_number(self.length_penalty), "length_penalty", "must be a finite number")
        require(
            self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
            "early_stopping",
            'must be true, false or "never"',
        )
        # What may go along with a beam search is server/features.py's to say.
        refused = features.refusal("beam", self)
        if refused == "grammar":  # the client asked for structured output, which the engine names "grammar"
            raise InvalidRequest("use_beam_search: cannot be combined with structured output", param="use_beam_search")
        if refused is not None:
            raise InvalidRequest(f"{refused}: not supported with beam search ({features.RULES[refused].why})", param=refused)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Scored:
    """An output token's raw scores, and where its text starts in the request's output text."""

    logprobs: TokenLogprobs
    text_offset: int


@dataclass(frozen=True)
class Hypothesis:
    """One finished beam-search sequence, as returned: its text, tokens (a final stop token included), scores."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Scored, ...]  # raw scores of each token, when the request asked for logprobs
    score: float  # sum of the tokens' log-probabilities / len(token_ids) ** length_penalty
    finish_reason: FinishReason


@dataclass(frozen=True)
class Event:
    """What one step made of one request: new text and tokens; the last event carries the finish reason.

    `logprobs` are those of exactly the tokens whose text is in `text` (text held back keeps its scores
    until it goes out; the final event carries whatever is left, stop-string tokens included).
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[Scored, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # first event only: prompt tokens 1..P-1
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None  # set with finish_reason ERROR; safe to show a client
    stop_string: str | None = None  # set with finish_reason STOP when a stop string (not a token) ended it
    beams: tuple[Hypothesis, ...] | None = None  # beam search: the final event's best sequences, best first

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Stream:
    """What turns a request's tokens into its events, and where they go: written on the loop thread by
    server/outputs.py, read on the request's event loop. (vLLM keeps the same in its output processor.)"""

    loop: asyncio.AbstractEventLoop
    detokenizer: Detokenizer
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    unsent_logprobs: list[Scored] = field(default_factory=list)  # scores of tokens whose text is held back
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass(eq=False)
class Request:
    """A request as the engine tracks it: admitted, scheduled, ended. Its rows stand in the batch for it."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: the params' value, or what the context leaves
    stop_token_ids: frozenset[int]  # end-of-sequence (unless ignore_eos) and the params' stop tokens
    stream: Stream
    block_keys: list[int] = field(default_factory=list)  # prefix-cache chain of the prompt less its last token
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (set by the scheduler)
    prefilled: int = 0  # prompt tokens whose KV exists or is planned, while prefilled in chunks
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    grammar: GrammarState | None = None  # this request's own walk through params.grammar
    search: BeamSearch | None = None  # a beam request's search (`begin_search`), which owns its rows
    rows: list[Row] = field(init=False)  # its own row, or its search's

    def __post_init__(self) -> None:
        self.rows = [Row(self, self.output_ids)]

    def begin_search(self, search: BeamSearch) -> None:
        """Run as a beam search: its beams are its rows."""
        self.search, self.rows = search, search.rows

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens of its rows (a beam search's are all alike)."""
        return self.rows[0].num_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.output_ids), self.cached_tokens)
