"""Reading tool calls back out of an answer as it streams: its text, and OpenAI's tool-call deltas.

The grammar (server/tools.py) fixed the calls' layout byte for byte in the model's format, so the reader
follows that layout rather than parsing free text after the fact.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from server.tools import ToolFormat


@dataclass
class Call:
    id: str
    name: str = ""
    arguments: str = ""

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What a piece of the answer adds: text for `content`, and OpenAI's tool-call deltas."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class _OffLayout(Exception):
    """The answer left the calls' layout."""


class CallReader:
    """Splits an answer, fed as it streams, into its text and its calls, in one format.

    The grammar fixed the calls' layout byte for byte, except inside the arguments, whose end is found by
    counting brackets outside JSON strings. A call's header (id, name) goes out once its name is read, then its
    arguments in fragments as they arrive. Text that could be the start of the trigger is held back until the
    next piece tells. An answer cut inside the calls before any call's name (max_tokens) is text; if an answer
    leaves the layout (no grammar held it), the rest is dropped once a call has gone out, else it is text.
    """

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.calls: list[Call] = []
        self.content = ""
        self._pending = ""  # fed, not yet read
        self._raw = ""  # everything fed since the calls began
        self._in_calls = False
        self._started = False
        self._done = False
        self._parser = self._layout()
        next(self._parser)

    def feed(self, text: str) -> Delta:
        delta = Delta()
        self._pending += text
        if not self._in_calls:
            self._text(delta, final=False)
        elif not self._done:
            self._raw += text
        if self._in_calls and not self._done:
            self._read(delta)
        return delta

    def finish(self) -> Delta:
        """The end of the answer: what is still held goes out as text."""
        delta = Delta()
        if not self._in_calls:
            self._text(delta, final=True)
        elif not self.calls:
            self._emit_text(delta, self._raw)
        return delta

    def _emit_text(self, delta: Delta, text: str) -> None:
        delta.content += text
        self.content += text

    def _text(self, delta: Delta, final: bool) -> None:
        fmt, pending = self.fmt, self._pending
        if not fmt.text_before:
            if not self._started and pending:
                self._started = True
                self._in_calls = pending.startswith(fmt.trigger)
                self._raw = pending if self._in_calls else ""
            if not self._in_calls:
                self._emit_text(delta, pending)
                self._pending = ""
            return
        at = pending.find(fmt.trigger)
        if at >= 0:
            self._emit_text(delta, pending[:at])
            self._pending = self._raw = pending[at:]
            self._in_calls = True
            return
        keep = 0 if final else _partial_suffix(pending, fmt.trigger)
        self._emit_text(delta, pending[: len(pending) - keep])
        self._pending = pending[len(pending) - keep :]

    def _read(self, delta: Delta) -> None:
        try:
            self._parser.send(delta)
        except StopIteration:
            self._done = True
        except _OffLayout:
            self._done = True
            if not self.calls:
                self._emit_text(delta, self._raw)

    def _layout(self) -> Generator[None, Delta, None]:
        """The calls' layout, read as text arrives: each `yield` waits for more; `send(delta)` resumes with the
        delta the new text's reading adds to."""
        fmt = self.fmt
        delta = yield
        delta = yield from self._literal(fmt.open + fmt.before, delta)
        while True:
            delta = yield from self._literal('{"name": "', delta)
            name, delta = yield from self._until('"', delta)
            call = Call(id=f"call_{secrets.token_hex(12)}", name=name)
            self.calls.append(call)
            index = len(self.calls) - 1
            delta.tool_calls.append({"index": index, **call.json()})
            delta = yield from self._literal(f', "{fmt.key}": ', delta)
            delta = yield from self._arguments(call, index, delta)
            delta = yield from self._literal("}" + fmt.after, delta)
            another = fmt.between + fmt.before
            if not (fmt.parallel and another):
                return
            following, delta = yield from self._either(another, fmt.close, delta)
            if following != another:
                return

    def _literal(self, text: str, delta: Delta) -> Generator[None, Delta, Delta]:
        while not self._pending.startswith(text):
            if not text.startswith(self._pending):
                raise _OffLayout
            delta = yield
        self._pending = self._pending[len(text) :]
        return delta

    def _until(self, stop: str, delta: Delta) -> Generator[None, Delta, tuple[str, Delta]]:
        while stop not in self._pending:
            delta = yield
        head, _, self._pending = self._pending.partition(stop)
        return head, delta

    def _either(self, first: str, second: str, delta: Delta) -> Generator[None, Delta, tuple[str, Delta]]:
        """Which of two literals comes next (consumed; `second` may be empty: the end)."""
        options = [option for option in (first, second) if option]
        while True:
            for option in options:
                if self._pending.startswith(option):
                    self._pending = self._pending[len(option) :]
                    return option, delta
            if not any(option.startswith(self._pending) for option in options):
                raise _OffLayout
            delta = yield

    def _arguments(self, call: Call, index: int, delta: Delta) -> Generator[None, Delta, Delta]:
        """Stream the arguments object: brackets counted outside strings until it closes."""
        depth, in_string, escaped = 0, False, False
        while True:
            taken, closed = 0, False
            for char in self._pending:
                taken += 1
                if in_string:
                    if escaped:
                        escaped = False
                    elif char == "\\":
                        escaped = True
                    elif char == '"':
                        in_string = False
                elif char == '"':
                    in_string = True
                elif char in "{[":
                    depth += 1
                elif char in "}]":
                    depth -= 1
                    closed = depth == 0
                    if closed:
                        break
            piece, self._pending = self._pending[:taken], self._pending[taken:]
            if piece:
                call.arguments += piece
                delta.tool_calls.append({"index": index, "function": {"arguments": piece}})
            if closed:
                return delta
            delta = yield


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: the next piece may finish it)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

