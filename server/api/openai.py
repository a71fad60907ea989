"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Path, Request, Response

from models.types import TokenLogprobs
from server.api import chat
from server.api.blocks import Blocks
from server.api.bodies import ChatCompletion, Completion, ModelCard, ModelList
from server.api.auth import require_api_key
from server.api.errors import ModelNotFound, Unauthorized, documented
from server.api.generation import ChoiceResult, Choices, created, whole
from server.api.streaming import OpenAIStream, generation_responses, stream
from server.api.logprobs import CompletionLogprobs, EchoedPrompt, TokenIds, TokenNames, chat_content
from server.api.fields import LIMIT, Limit
from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.state import AppState, state_of
from server.engine import Engine
from server.errors import EngineUnavailable, InvalidRequest
from server.prompt import encode_completion
from server.request import Event, SamplingParams, Scored
from server import tools
from server.call_reader import CallReader, Delta

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(Unauthorized))


def _generation_responses(body: type) -> dict[int | str, dict[str, Any]]:
    return generation_responses(
        body,
        "The whole answer as JSON; with `stream: true`, Server-Sent Events: `data: {chunk}` lines, an error after "
        "the start as `data: {\"error\": ...}`, and a final `data: [DONE]`.",
    )


def model_card(state: AppState) -> dict[str, Any]:
    engine = state.require_engine()
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "tokenferry",
        "max_model_len": engine.info.context_length,
        "quantization": engine.info.quantization,
    }


@router.get("/models", response_model=ModelList, responses=documented(EngineUnavailable))
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state_of(request))]}


@router.get("/models/{model:path}", response_model=ModelCard, responses=documented(ModelNotFound, EngineUnavailable))
async def retrieve_model(
    model: Annotated[str, Path(json_schema_extra={LIMIT: Limit.SERVED_MODEL.value})], request: Request
) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(model)
    return model_card(state)


# The 200 bodies are documented through `responses`: the routes return their own Response (JSON or SSE), so
# FastAPI has nothing to validate against a response_model.
@router.post(CHAT_ROUTE.removeprefix("/v1"), responses=_generation_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    engine = _prepare(state, body)
    turn = chat.ChatTurn(body.template_messages(), body.tool_request(), body.constraint())
    prompt = chat.encode(state, turn)
    grammar = await chat.grammar(state, turn)
    max_tokens, name = body.requested_max_tokens
    params = body.sampling_params(max_tokens, grammar=grammar)
    choices = _submit(engine, body, [prompt], params, {"prompt": "messages", "max_tokens": name})
    chunk_id, vocab = f"chatcmpl-{choices.request_id}", _vocab(state, body)
    if turn.calls:
        chunks: Chunks = ToolCallChunks(chunk_id, created(), state.model_name, vocab, body.output_logprobs, state.tool_format)
    else:
        chunks = ChatChunks(chunk_id, created(), state.model_name, vocab, body.output_logprobs)
    return await _answer(choices, chunks, body, request, CHAT_ROUTE)


@router.post(COMPLETIONS_ROUTE.removeprefix("/v1"), responses=_generation_responses(Completion))
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    engine = _prepare(state, body)
    constraint = body.constraint()
    prompts = [p if isinstance(p, list) else encode_completion(engine.tokenizer, p) for p in body.prompts()]
    grammar = await chat.compile_constraint(engine, constraint)
    params = body.sampling_params(body.max_tokens, prompt_logprobs=body.prompt_logprobs, grammar=grammar)
    choices = _submit(engine, body, prompts, params, {})
    chunks = CompletionChunks(
        f"cmpl-{choices.request_id}",
        created(),
        state.model_name,
        _vocab(state, body),
        body.output_logprobs,
        echoed=[EchoedPrompt.of(engine.tokenizer, p) for p in prompts] if body.echo else None,
        prompts=prompts,
        per_prompt=body.n,
    )
    return await _answer(choices, chunks, body, request, COMPLETIONS_ROUTE)


def _vocab(state: AppState, body: SamplingFields) -> TokenNames:
    return TokenIds(state.token_text) if body.return_tokens_as_token_ids else state.token_text


def _prepare(state: AppState, body: SamplingFields) -> Engine:
    engine = state.require_engine()
    state.check_model(body.model)
    if refused := body.unsupported():
        raise InvalidRequest(f"unsupported field(s): {', '.join(refused)}", param=refused[0])
    body.check_relations()
    return engine


def _submit(
    engine: Engine, body: SamplingFields, prompts: list[list[int]], params: SamplingParams, names: dict[str, str]
) -> Choices:
    # The engine's beam parameters are the client's best_of (or n) and n.
    names = {**names, "beam_width": "best_of" if body.best_of is not None else "n", "beam_returns": "n"}
    return chat.submit(engine, prompts, params, names, body.candidates)


async def _answer(choices: Choices, chunks: Chunks, body: SamplingFields, request: Request, route: str) -> Response:
    """The SSE stream, or the whole answer once every choice is done."""
    if body.stream:
        return stream(choices, OpenAIStream(chunks, body.include_usage), route)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        returned = choices.best(results, body.n)
        return {
            **chunks.envelope(chunks.response_object),
            "choices": [chunks.choice(i, r) for i, r in enumerate(returned)],
            "usage": choices.usage(results),
        }

    return await whole(choices, request, route, build)


@dataclass
class Chunks:
    """The envelope every response and chunk of one request shares, and how its scores are shown."""

    id: str
    created: int
    model: str
    vocab: TokenNames
    logprobs: int | None  # top entries per token the client asked for; None: no scores in the answer
    chunk_object: ClassVar[str]
    response_object: ClassVar[str]

    def envelope(self, kind: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": kind or self.chunk_object, "created": self.created, "model": self.model}

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.envelope(), "choices": [], "usage": usage}


class ChatChunks(Chunks):
    chunk_object = "chat.completion.chunk"
    response_object = "chat.completion"

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(result.text)}
        logprobs = self._logprobs(result.logprobs)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": str(result.finish_reason)}

    def _chunk(
        self, index: int, delta: dict[str, str], finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.envelope(), "choices": [choice]}

    def _logprobs(self, scored: list[Scored] | tuple[Scored, ...]) -> dict[str, Any] | None:
        return None if self.logprobs is None else {"content": chat_content(scored, self.logprobs, self.vocab)}

    def start(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""})

    def delta(self, index: int, event: Event) -> dict[str, Any] | None:
        if not event.text and not (event.logprobs and self.logprobs is not None):
            return None
        return self._chunk(index, {"content": event.text}, logprobs=self._logprobs(event.logprobs))

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, {}, reason)


@dataclass
class ToolCallChunks(ChatChunks):
    """A chat answer that may call tools (server/tools.py): its text is `content`, its calls `tool_calls`, and
    finish_reason is "tool_calls" when it ended after calling. Streamed, text goes out as text and each call as
    OpenAI's deltas: its index, id, type and name first, then its arguments in fragments as they are written."""

    fmt: tools.ToolFormat = tools.FORMATS["hermes"]
    readers: dict[int, CallReader] = field(default_factory=dict)

    def _reader(self, index: int) -> CallReader:
        return self.readers.setdefault(index, CallReader(self.fmt))

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        answer = super().choice(index, result)
        blocks = Blocks.read(self.fmt, answer["message"]["content"])
        if blocks.calls:
            calls = [call.json() for call in blocks.calls]
            answer["message"] = {"role": "assistant", "content": blocks.text or None, "tool_calls": calls}
            answer["finish_reason"] = _finish(True, answer["finish_reason"])
        return answer

    def delta(self, index: int, event: Event) -> dict[str, Any] | None:
        return self._delta_chunk(index, self._reader(index).feed(event.text), event)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        reader = self.readers.pop(index, None) or CallReader(self.fmt)
        held = reader.finish()
        return self._chunk(index, {"content": held.content} if held.content else {}, _finish(bool(reader.calls), reason))

    def _delta_chunk(self, index: int, delta: Delta, event: Event) -> dict[str, Any] | None:
        scores = event.logprobs and self.logprobs is not None
        if not delta and not scores:
            return None
        body: dict[str, Any] = {}
        if delta.content or not delta.tool_calls:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = delta.tool_calls
        return self._chunk(index, body, logprobs=self._logprobs(event.logprobs))


def _finish(called: bool, reason: str) -> str:
    """"tool_calls" for an answer that ended after calling, else its own reason (a call cut by max_tokens is
    "length")."""
    return "tool_calls" if called and reason == "stop" else reason


@dataclass
class CompletionChunks(Chunks):
    echoed: list[EchoedPrompt] | None = None  # by prompt, when the request echoes its prompts
    prompts: list[list[int]] = field(default_factory=list)
    per_prompt: int = 1  # choices per prompt: choice i answers prompt i // per_prompt
    started: set[int] = field(default_factory=set)  # choices whose echo has been streamed

    chunk_object = response_object = "text_completion"

    def choice(self, index: int, result: ChoiceResult) -> dict[str, Any]:
        text, logprobs = self._body(index, "".join(result.text), result.logprobs, result.prompt_logprobs, echo=True)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": str(result.finish_reason)}

    def _body(
        self,
        index: int,
        text: str,
        scored: Sequence[Scored],
        prompt_scores: Sequence[TokenLogprobs] | None,
        echo: bool,
    ) -> tuple[str, dict[str, Any] | None]:
        """Text and scores of some output tokens, after the echoed prompt's when `echo` (once per choice).

        Offsets count from the start of the choice's whole text, the echoed prompt included.
        """
        prompt_index = index // self.per_prompt
        echoed = self.echoed[prompt_index] if self.echoed is not None else None
        prefix = echoed.text if echoed is not None and echo else ""
        if self.logprobs is None:
            return prefix + text, None
        logprobs = CompletionLogprobs.empty()
        if prefix:
            logprobs.add_prompt(self.prompts[prompt_index], prompt_scores or (), echoed, self.vocab)
        logprobs.add_output(scored, len(echoed.text) if echoed is not None else 0, self.vocab)
        return prefix + text, logprobs.json()

    def _chunk(
        self, index: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.envelope(), "choices": [choice]}

    def start(self, index: int) -> None:
        return None

    def delta(self, index: int, event: Event) -> dict[str, Any] | None:
        # The echo goes out with a choice's first event, which carries the prompt's scores.
        first = index not in self.started
        self.started.add(index)
        text, logprobs = self._body(index, event.text, event.logprobs, event.prompt_logprobs, echo=first)
        if not text and not (logprobs and logprobs["tokens"]):
            return None
        return self._chunk(index, text, logprobs=logprobs)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, "", reason)
