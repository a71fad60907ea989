"""A chat turn into the engine, whichever API it came through (OpenAI chat, Anthropic Messages, Responses).

Each API translates its body into the same three things: messages as `server.tools.conversation` takes them,
the tools offered (a `ToolRequest`, or None), and a structured-output constraint. From there the prompt, the
grammar and the submission are the same for all, so a request runs in the same batch, with the same sampling,
prefix cache and grammars, whichever API it used.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from server import tools
from server.api.generation import Choices
from server.api.state import AppState
from server.engine import Engine
from server.errors import InvalidRequest
from server.logs import REQUEST_ID
from server.prompt import encode_chat, supports_tools, with_system_text
from server.request import SamplingParams
from server.grammars import Grammar
from server.structured import Constraint


@dataclass(frozen=True)
class ChatTurn:
    """What a chat-shaped request asks, translated from its API."""

    messages: list[dict[str, Any]]  # {"role", "content", "tool_calls" (CallMessage list), "tool_call_id"}
    tools: tools.ToolRequest | None = None  # None: no tools offered
    constraint: Constraint | None = None

    @property
    def calls(self) -> bool:
        """Whether the answer may call tools: its text is then read for calls (server/api/blocks.py)."""
        return self.tools is not None and self.tools.calls


def encode(state: AppState, turn: ChatTurn) -> list[int]:
    """The turn's prompt: its conversation through the chat template, with the tools where the template takes
    them, else described in a system message in the model's tool-call format."""
    engine = state.require_engine()
    fmt, native = state.tool_format, supports_tools(engine.tokenizer)
    messages = tools.conversation(turn.messages, fmt, native)
    offered = None
    if turn.tools is not None:
        if native:
            offered = [f.tool() for f in turn.tools.functions]
        else:
            messages = with_system_text(messages, tools.describe(fmt, turn.tools))
    return encode_chat(engine.tokenizer, messages, state.config.allow_special_tokens, offered)


async def grammar(state: AppState, turn: ChatTurn) -> Grammar | None:
    """The grammar the answer is held to: the tool calls' (lazy under "auto"), the constraint's, or None."""
    engine = state.require_engine()
    if turn.tools is not None and turn.calls:
        return await _compile_tools(engine, state.tool_format, turn.tools)
    return await compile_constraint(engine, turn.constraint)


async def compile_constraint(engine: Engine, constraint: Constraint | None) -> Grammar | None:
    """The constraint's grammar, compiled off the engine thread (or from the cache); a 400 if it is refused."""
    return None if constraint is None else await engine.grammars.compile(constraint.spec)


async def _compile_tools(engine: Engine, fmt: tools.ToolFormat, tool_request: tools.ToolRequest) -> Grammar:
    """The tool calls' grammar; refused, a 400 naming the tool whose schema the backend cannot enforce."""
    whole, parts = tools.specs(fmt, tool_request)
    try:
        return await engine.grammars.compile(whole)
    except InvalidRequest:
        for part in parts:
            await engine.grammars.compile(part)  # raises, naming tools[i].function.parameters
        raise


@dataclass(frozen=True)
class Started:
    """A chat turn on its way: its prompt, its engine requests, and how to read calls back out of its answer."""

    prompt: list[int]
    choices: Choices
    fmt: tools.ToolFormat | None  # the tool-call format when the answer may call tools; None: it is text


async def start(
    state: AppState,
    turn: ChatTurn,
    sampling: Callable[[Grammar | None], SamplingParams],
    names: dict[str, str],
    renames: dict[str, str],
) -> Started:
    """Encode, compile and submit one turn whose errors name fields as `renames` says (see `named_as`), with the
    sampling parameters `sampling` makes around its grammar."""
    with named_as(renames):
        prompt = encode(state, turn)
        compiled = await grammar(state, turn)
    choices = submit(state.require_engine(), [prompt], sampling(compiled), names)
    return Started(prompt, choices, state.tool_format if turn.calls else None)


def submit(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    names: dict[str, str],
    candidates: int = 1,
) -> Choices:
    """Queue `candidates` engine requests per prompt under one id; `names` map engine parameters to the API's."""
    # A fresh suffix keeps engine ids unique even when a client reuses its X-Request-ID.
    choices = Choices(engine, f"{REQUEST_ID.get()}.{secrets.token_hex(3)}")
    choices.submit(prompts, params, candidates, names)
    return choices


@contextmanager
def named_as(renames: dict[str, str]) -> Iterator[None]:
    """Errors raised inside name fields as OpenAI's chat does (`tools[0].function.parameters`); this rewrites
    those names into the API's own (`tools[0].input_schema`): each key, a regex over the name, by its value."""
    try:
        yield
    except InvalidRequest as exc:
        if exc.param:
            param = exc.param
            for pattern, replacement in renames.items():
                param = re.sub(pattern, replacement, param)
            exc.message, exc.param = exc.message.replace(exc.param, param, 1), param
        raise
