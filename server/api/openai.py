"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.api.errors import ModelNotFound, Unauthorized
from server.api.generation import ChoiceResult, Choices, ClientGone, collect, created, stream
from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.state import AppState, state_of
from server.engine import Engine
from server.errors import InvalidRequest
from server.logs import REQUEST_ID
from server.prompt import encode_chat, encode_completion, supports_tools, with_system_text
from server.structured import Constraint, Grammar, ToolCalls, tool_prompt

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


async def require_api_key(request: Request) -> None:
    """With --api-key set, every /v1 route wants `Authorization: Bearer <key>`, compared in constant time."""
    key = state_of(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def model_card(state: AppState) -> dict[str, Any]:
    engine = state.require_engine()
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "tokenferry",
        "max_model_len": engine.info.context_length,
    }


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state_of(request))]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    _check_model(state, model)
    return model_card(state)


@router.post(CHAT_ROUTE.removeprefix("/v1"))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    engine = _prepare(state, body)
    constraint = body.constraint()
    messages, tools = body.template_messages(), None
    if constraint is not None and constraint.tool_calls is not None:
        if supports_tools(engine.tokenizer):
            tools = constraint.tools
        else:
            messages = with_system_text(messages, tool_prompt(constraint))
    prompt = encode_chat(engine.tokenizer, messages, state.config.allow_special_tokens, tools)
    grammar = await _compile(engine, constraint)
    max_tokens, name = body.requested_max_tokens
    choices = _submit(engine, body, [prompt], max_tokens, {"prompt": "messages", "max_tokens": name}, grammar)
    chunk_id = f"chatcmpl-{choices.request_id}"
    if constraint is not None and constraint.tool_calls is not None:
        chunks: Chunks = ToolCallChunks(chunk_id, created(), state.model_name, constraint.tool_calls)
    else:
        chunks = ChatChunks(chunk_id, created(), state.model_name)
    return await _answer(choices, chunks, body, request, CHAT_ROUTE)


@router.post(COMPLETIONS_ROUTE.removeprefix("/v1"))
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    engine = _prepare(state, body)
    constraint = body.constraint()
    prompts = [p if isinstance(p, list) else encode_completion(engine.tokenizer, p) for p in body.prompts()]
    grammar = await _compile(engine, constraint)
    choices = _submit(engine, body, prompts, body.max_tokens, {}, grammar)
    chunks = CompletionChunks(f"cmpl-{choices.request_id}", created(), state.model_name)
    return await _answer(choices, chunks, body, request, COMPLETIONS_ROUTE)


def _check_model(state: AppState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {state.model_name!r}", param="model")


def _prepare(state: AppState, body: SamplingFields) -> Engine:
    engine = state.require_engine()
    _check_model(state, body.model)
    if refused := body.unsupported():
        raise InvalidRequest(f"unsupported field(s): {', '.join(refused)}", param=refused[0])
    return engine


async def _compile(engine: Engine, constraint: Constraint | None) -> Grammar | None:
    """The constraint's grammar, compiled off the engine thread (or from the cache); a 400 if it is refused."""
    return None if constraint is None else await engine.grammars.compile(constraint.spec)


def _submit(
    engine: Engine,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    names: dict[str, str],
    grammar: Grammar | None = None,
) -> Choices:
    # A fresh suffix keeps engine ids unique even when a client reuses its X-Request-ID.
    choices = Choices(engine, f"{REQUEST_ID.get()}.{secrets.token_hex(3)}")
    params = body.sampling_params(max_tokens)
    choices.submit(prompts, params if grammar is None else replace(params, grammar=grammar), body.n, names)
    return choices


async def _answer(choices: Choices, chunks: Chunks, body: SamplingFields, request: Request, route: str) -> Response:
    """The SSE stream, or the whole answer once every choice is done."""
    if body.stream:
        return stream(choices, chunks, body.include_usage, route)
    try:
        results = await collect(choices, request, route)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(
        {
            **chunks.envelope(chunks.response_object),
            "choices": [chunks.choice(i, r) for i, r in enumerate(results)],
            "usage": choices.usage(results),
        }
    )


@dataclass(frozen=True)
class Chunks:
    """The envelope every response and chunk of one request shares."""

    id: str
    created: int
    model: str
    chunk_object: ClassVar[str]
    response_object: ClassVar[str]

    def envelope(self, kind: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": kind or self.chunk_object, "created": self.created, "model": self.model}

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.envelope(), "choices": [], "usage": usage}


class ChatChunks(Chunks):
    chunk_object = "chat.completion.chunk"
    response_object = "chat.completion"

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(result.text)}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": str(result.finish_reason)}

    def _chunk(self, index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.envelope(), "choices": [choice]}

    def start(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""})

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, {"content": text})

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, {}, reason)


@dataclass(frozen=True)
class ToolCallChunks(ChatChunks):
    """A chat answer constrained to a tool call: a complete call becomes `tool_calls` with finish_reason
    "tool_calls". When streaming, the call's text is held until the call is complete, then sent in one chunk
    with the finish reason; an answer that is not a complete call (cut by max_tokens or a stop string) is
    sent as plain content with its own finish reason."""

    tool_calls: ToolCalls = ToolCalls(None)
    held: dict[int, list[str]] = field(default_factory=dict)

    def _calls(self, text: str, reason: str) -> list[dict[str, Any]] | None:
        calls = self.tool_calls.parse(text) if reason == "stop" else None
        if calls is None:
            return None
        return [
            {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls
        ]

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        answer = super().choice(index, result)
        if (calls := self._calls(answer["message"]["content"], answer["finish_reason"])) is not None:
            answer["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            answer["finish_reason"] = "tool_calls"
        return answer

    def delta(self, index: int, text: str) -> None:
        self.held.setdefault(index, []).append(text)
        return None

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        text = "".join(self.held.pop(index, []))
        if (calls := self._calls(text, reason)) is not None:
            return self._chunk(index, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}, "tool_calls")
        return self._chunk(index, {"content": text} if text else {}, reason)


class CompletionChunks(Chunks):
    chunk_object = response_object = "text_completion"

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        return {"index": index, "text": "".join(result.text), "logprobs": None, "finish_reason": str(result.finish_reason)}

    def _chunk(self, index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self.envelope(), "choices": [choice]}

    def start(self, index: int) -> None:
        return None

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, text)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, "", reason)
