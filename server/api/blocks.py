"""An answer as a sequence of content blocks, as Anthropic's Messages and OpenAI's Responses stream it: a
text block, then one block per tool call, each opened, grown and closed in turn.

`Blocks` reads the answer's text as it streams (through `server.call_reader.CallReader` when tools were offered,
which splits text from calls) and says what happened to which block. The API modules turn those happenings
into their own events; the whole answer is the same reading done at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.call_reader import Call, CallReader, Delta
from server.tools import ToolFormat


@dataclass
class Block:
    index: int  # its place among the answer's blocks
    text: str = ""  # the text, or the call's arguments so far (JSON text)
    call: Call | None = None  # a call's id and name; None: a text block


@dataclass(frozen=True)
class Change:
    """What happened to a block: "open" (empty), "grow" by `piece`, or "close" (complete)."""

    what: Literal["open", "grow", "close"]
    block: Block
    piece: str = ""


@dataclass
class Blocks:
    fmt: ToolFormat | None  # the tool-call format when tools were offered; None: the answer is text
    blocks: list[Block] = field(default_factory=list)
    _open: Block | None = None
    _reader: CallReader | None = None

    def __post_init__(self) -> None:
        self._reader = CallReader(self.fmt) if self.fmt is not None else None

    @property
    def calls(self) -> list[Call]:
        return [b.call for b in self.blocks if b.call is not None]

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.blocks if b.call is None)

    def feed(self, text: str) -> list[Change]:
        return self._apply(self._reader.feed(text) if self._reader else Delta(content=text))

    def finish(self) -> list[Change]:
        """The end of the answer: what the reader held goes out, and the last block closes."""
        changes = self._apply(self._reader.finish()) if self._reader else []
        return changes + self._close()

    @classmethod
    def read(cls, fmt: ToolFormat | None, text: str) -> Blocks:
        """A whole answer's blocks."""
        blocks = cls(fmt)
        blocks.feed(text)
        blocks.finish()
        return blocks

    def _apply(self, delta: Delta) -> list[Change]:
        changes: list[Change] = []
        if delta.content:
            if self._open is None or self._open.call is not None:
                changes += self._close() + self._start(Block(len(self.blocks)))
            changes += self._grow(delta.content)
        for piece in delta.tool_calls:
            if "id" in piece:  # a call's header (only a reader makes one): a new block, whose arguments follow
                assert self._reader is not None
                changes += self._close() + self._start(Block(len(self.blocks), call=self._reader.calls[piece["index"]]))
            if arguments := piece["function"].get("arguments"):
                changes += self._grow(arguments)
        return changes

    def _start(self, block: Block) -> list[Change]:
        self.blocks.append(block)
        self._open = block
        return [Change("open", block)]

    def _grow(self, piece: str) -> list[Change]:
        assert self._open is not None
        self._open.text += piece
        return [Change("grow", self._open, piece)]

    def _close(self) -> list[Change]:
        block, self._open = self._open, None
        return [Change("close", block)] if block is not None else []
