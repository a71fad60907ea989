"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt, or chat messages rendered exactly as a chat
completion renders them (template, tools), in; token ids and their count out; and token ids back to text."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from server.api import chat
from server.api.auth import require_api_key
from server.api.errors import ModelNotFound, Unauthorized, documented
from server.api.fields import LIMIT, TOOL, Limit, TokenIds, doc
from server.api.messages import ChatMessage, template_messages
from server.api.state import state_of
from server.errors import EngineUnavailable, InvalidRequest, require
from server.prompt import encode_completion
from server.tools import MAX_TOOLS, parse_tools

router = APIRouter(dependencies=[Depends(require_api_key)], responses=documented(Unauthorized, InvalidRequest, ModelNotFound, EngineUnavailable))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Annotated[StrictStr, doc(**{LIMIT: Limit.SERVED_MODEL.value})] | None = None
    return_token_strs: StrictBool = False


class TokenizePrompt(_Body):
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class TokenizeChat(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[dict[str, Any]] | None, doc(maxItems=MAX_TOOLS, items=TOOL)] = None
    # The prompt a chat completion would run: a new assistant turn after the messages, nothing added.
    add_generation_prompt: Annotated[StrictBool, doc(enum=[True])] = True
    continue_final_message: Annotated[StrictBool, doc(enum=[False])] = False
    add_special_tokens: Annotated[StrictBool, doc(enum=[False])] = False

    def check(self) -> None:
        """Only the prompt a chat completion runs can be counted (vLLM's other renderings are not served)."""
        for name, served in (("add_generation_prompt", True), ("continue_final_message", False), ("add_special_tokens", False)):
            require(getattr(self, name) is served, name, f"only {str(served).lower()} is supported")


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeRequest(_Body):
    tokens: TokenIds


class Detokenized(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=Tokenized)
async def tokenize(body: TokenizePrompt | TokenizeChat, request: Request) -> dict[str, Any]:
    state = state_of(request)
    engine = state.require_engine()
    state.check_model(body.model)
    if isinstance(body, TokenizePrompt):
        ids = encode_completion(engine.tokenizer, body.prompt, body.add_special_tokens)
    else:
        body.check()
        tools = parse_tools(body.tools, None, None)
        ids = chat.encode(state, chat.ChatTurn(template_messages(body.messages), tools))
    strings = list(engine.tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.info.context_length, "tokens": ids, "token_strs": strings}


@router.post("/detokenize", response_model=Detokenized)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    state = state_of(request)
    engine = state.require_engine()
    state.check_model(body.model)
    vocab = engine.info.vocab_size
    for index, token in enumerate(body.tokens):
        require(0 <= token < vocab, f"tokens[{index}]", f"{token} is not a token id: the vocabulary has {vocab}")
    return {"prompt": engine.tokenizer.decode(body.tokens)}

