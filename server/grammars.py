"""Grammars: compiled off the engine thread, cached, and walked one token at a time by each constrained request.

- `GrammarCompiler.compile(spec)` turns a spec (server/structured.py, server/tools.py) into a `Grammar` on a small
  worker pool, with a time limit, behind a bounded LRU cache keyed by a hash of the spec's canonical text. A
  request is queued only once its grammar is ready, so a slow compile never stalls the rows already running.
- `Grammar.start()` gives each request its own `GrammarState`: the engine thread asks it for the tokens
  allowed next (an int32 bitmask that models/grammar.py applies to the logits) and advances it with every
  accepted token.

The backend is llguidance, behind the small `Backend` interface, so another one can be added. It refuses
the schema keywords it cannot enforce; that refusal is a 400, never a silent fall back to free text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from server import metrics
from server.errors import InvalidRequest
from server.structured import JSON_OPTIONS, GrammarSpec

COMPILE_WORKERS = 2
COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256
MAX_ERROR_CHARS = 400


class GrammarError(Exception):
    """The backend refused a grammar; the message says why and is safe to show a client."""


class GrammarViolation(Exception):
    """A token the grammar does not allow reached the matcher: a bug, which fails that one request."""


# ---- compiled grammars and their per-request state ----


class Grammar(Protocol):
    """A compiled grammar, shared by every request that asks for it; immutable."""

    def start(self) -> GrammarState: ...


class Matcher(Protocol):
    """A backend's per-request matcher."""

    def fill_mask(self, mask: np.ndarray) -> None: ...

    def consume(self, token: int) -> bool: ...

    def is_complete(self) -> bool: ...

    def error(self) -> str: ...


class GrammarState:
    """One request's place in its grammar. Used by the engine thread only.

    `allowed_tokens()` is an int32 bitmask over the vocabulary: token t is allowed when bit t % 32 of word
    t // 32 is set. It is computed once per position, only for constrained rows.
    """

    def __init__(self, matcher: Matcher, words: int, end_tokens: frozenset[int]) -> None:
        self._matcher = matcher
        self._mask = np.zeros(words, dtype=np.int32)
        self._masked_at = -1  # the position the mask was computed for
        self.position = 0  # tokens accepted so far
        self.end_tokens = end_tokens  # the end-of-sequence tokens the grammar allows once it is complete

    def allowed_tokens(self) -> np.ndarray:
        if self._masked_at != self.position:
            started = time.perf_counter()
            self._matcher.fill_mask(self._mask)
            metrics.GRAMMAR_MASK_TIME.observe(time.perf_counter() - started)
            self._masked_at = self.position
        return self._mask

    def allows_only(self, tokens: frozenset[int]) -> bool:
        """Whether every token allowed now is one of `tokens` (then suppressing them would leave nothing)."""
        bits = np.unpackbits(self.allowed_tokens().view(np.uint8), bitorder="little")
        inside = sum(int(bits[t]) for t in tokens if t < bits.size)
        return int(bits.sum()) == inside

    def accept(self, token: int) -> bool:
        """Advance by one accepted token; True once the grammar is complete (only the end may follow)."""
        if not self._matcher.consume(token):
            raise GrammarViolation(f"token {token} is not allowed by the grammar: {self._matcher.error()[:MAX_ERROR_CHARS]}")
        self.position += 1
        return self._matcher.is_complete()


class Backend(Protocol):
    """Compiles specs for one tokenizer. `compile` runs on a worker thread and raises GrammarError."""

    def compile(self, spec: GrammarSpec) -> Grammar: ...


class LLGuidanceBackend:
    """llguidance: a token trie built once per tokenizer (about 0.5 s for a 49k vocabulary), then
    compiles in milliseconds and masks in tens of microseconds."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_json)
        backend.no_padding()
        backend.no_truncation()
        self._llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.words = (vocab_size + 31) // 32
        self.end_tokens = frozenset(eos_token_ids)

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        LLMatcher = self._llg.LLMatcher
        try:
            if spec.kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(spec.text, overrides=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.text)
            elif spec.kind == "choice":
                options = json.loads(spec.text)
                grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
            elif spec.kind == "lark":
                grammar = self._llg.grammar_from("grammar", spec.text)  # Lark, or GBNF converted to Lark
            else:
                raise GrammarError(f"unknown grammar kind {spec.kind!r}")
            matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        except Exception as exc:  # the GBNF converter and the schema reader raise several types
            raise GrammarError(_one_line(str(exc))) from None
        except BaseException as exc:  # a panic inside the library (pyo3's PanicException) refuses the grammar
            if type(exc).__name__ != "PanicException":
                raise
            raise GrammarError(f"the grammar could not be compiled: {_one_line(str(exc))}") from None
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return LLGuidanceGrammar(matcher, self.words, self.end_tokens)


class LLGuidanceGrammar:
    def __init__(self, matcher: Any, words: int, end_tokens: frozenset[int]) -> None:
        self._matcher = matcher  # never advanced: each request walks a copy
        self._words = words
        self._end_tokens = end_tokens

    def start(self) -> GrammarState:
        return GrammarState(LLGuidanceMatcher(self._matcher.deep_copy()), self._words, self._end_tokens)


class LLGuidanceMatcher:
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_mask(self, mask: np.ndarray) -> None:
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def consume(self, token: int) -> bool:
        return self._matcher.consume_token(token)

    def is_complete(self) -> bool:
        return self._matcher.is_stopped()

    def error(self) -> str:
        return self._matcher.get_error()


def _one_line(text: str) -> str:
    """llguidance's messages can carry a parser dump after the first lines; keep the reason."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:MAX_ERROR_CHARS] or "invalid grammar"


class GrammarCompiler:
    """Compiles specs on a small worker pool with a time limit, behind a bounded LRU cache.

    The cache holds futures, so identical requests arriving together share one compile; a refused grammar
    is cached too (the refusal is as deterministic as the grammar). The backend (and the tokenizer trie
    it needs) is built on first use, on a worker thread.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        workers: int = COMPILE_WORKERS,
        cache_size: int = CACHE_SIZE,
        timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> None:
        # Serialized here, on the constructing thread: a tokenizer's backend must not be used by two threads.
        # A slow (Python) tokenizer has none; structured output is then refused request by request.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer_json = backend.to_str() if backend is not None else None
        self._vocab_size = vocab_size
        self._eos_token_ids = tuple(eos_token_ids)
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenferry-grammar")
        self._lock = threading.Lock()  # guards _cache
        self._backend_lock = threading.Lock()  # one worker builds the backend; the others wait for it
        self._cache: OrderedDict[str, Future[Grammar]] = OrderedDict()
        self._backend: Backend | None = None

    async def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar, or InvalidRequest (refused, or over the time limit) naming spec.param."""
        future = self._lookup(spec)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except TimeoutError:
            raise InvalidRequest(
                f"{spec.param}: the grammar took longer than {self.timeout_s:g} s to compile", param=spec.param
            ) from None
        except GrammarError as exc:
            raise InvalidRequest(f"{spec.param}: {exc}", param=spec.param) from None

    def compile_now(self, spec: GrammarSpec) -> Grammar:
        """The same, blocking, for callers without an event loop (tests, benchmarks)."""
        try:
            return self._lookup(spec).result(self.timeout_s)
        except GrammarError as exc:
            raise InvalidRequest(f"{spec.param}: {exc}", param=spec.param) from None

    def _lookup(self, spec: GrammarSpec) -> Future[Grammar]:
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not future.cancelled() and not _failed_unexpectedly(future):
                self._cache.move_to_end(key)
                metrics.GRAMMAR_CACHE.labels("hit").inc()
                return future
            metrics.GRAMMAR_CACHE.labels("miss").inc()
            future = self._executor.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: GrammarSpec) -> Grammar:
        started = time.perf_counter()
        with self._backend_lock:
            if self._backend is None:
                if self._tokenizer_json is None:
                    raise GrammarError("structured output needs a fast (Rust) tokenizer, which this model has not got")
                try:
                    self._backend = LLGuidanceBackend(self._tokenizer_json, self._vocab_size, self._eos_token_ids)
                except Exception as exc:  # not cached as a refusal: see _failed_unexpectedly
                    raise RuntimeError(f"structured output is unavailable for this tokenizer: {exc}") from exc
            backend = self._backend
        grammar = backend.compile(spec)
        metrics.GRAMMAR_COMPILE_TIME.observe(time.perf_counter() - started)
        return grammar

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _failed_unexpectedly(future: Future[Grammar]) -> bool:
    """A finished compile that raised something other than a refusal: worth another try."""
    return future.done() and future.exception() is not None and not isinstance(future.exception(), GrammarError)
