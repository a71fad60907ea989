"""Admission: a prompt and its parameters become a queued request, or an error naming what is wrong, before
anything is queued (the prompt's tokens, the context, the stop tokens, a beam search's width)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.beam import BeamSearch
from server.detokenizer import Detokenizer
from server.errors import ContextLengthExceeded, InvalidRequest
from server.request import Request, SamplingParams, Stream

if TYPE_CHECKING:
    from models import ModelInfo
    from models.prefix_cache import PrefixCache


@dataclass(frozen=True)
class ModelFacts:
    """What admission needs to know of the loaded model and the engine."""

    info: ModelInfo
    tokenizer: Any  # the loop thread's own: stop-string checks run there
    max_batch_size: int
    prefix_cache: PrefixCache | None


def admit(
    model: ModelFacts, prompt_ids: list[int], params: SamplingParams, request_id: str, loop: asyncio.AbstractEventLoop
) -> Request:
    """A request for `prompt_ids`, or InvalidRequest / ContextLengthExceeded naming what is wrong."""
    info = model.info
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < info.vocab_size for t in prompt_ids):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {info.vocab_size})", param="prompt")
    if params.beam_width is not None and params.beam_width > model.max_batch_size:
        raise InvalidRequest(
            f"beam_width ({params.beam_width}) exceeds the batch size ({model.max_batch_size}): each beam is a row",
            param="beam_width",
        )
    if any(not 0 <= t < info.vocab_size for t in params.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids must be in [0, {info.vocab_size})", param="stop_token_ids")
    room = info.context_length - len(prompt_ids)
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if room < 1 or max_tokens > room:
        raise ContextLengthExceeded(
            f"this model's context is {info.context_length} tokens; the prompt has {len(prompt_ids)} and "
            f"{max_tokens} more were asked for. Shorten the prompt or lower max_tokens.",
            param="max_tokens" if room >= 1 else "prompt",
        )
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids.update(info.eos_token_ids)
    # The last prompt token is always computed (its logits give the first token), so it is never looked up.
    keys = model.prefix_cache.keys_of(prompt_ids[:-1]) if model.prefix_cache else []
    request = Request(
        id=request_id,
        prompt_ids=prompt_ids,
        block_keys=keys,
        params=params,
        max_tokens=max_tokens,
        stop_token_ids=frozenset(stop_ids),
        stream=Stream(loop, Detokenizer(model.tokenizer, params.stop)),
        grammar=params.grammar.start() if params.grammar is not None else None,
    )
    if params.beam_width is not None:
        request.begin_search(BeamSearch(request, _stop_string_check(model.tokenizer, params.stop)))
    return request


def _stop_string_check(tokenizer: Any, stop: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
    """Whether some output tokens' text holds a stop string (beam search asks it of each continuation, on the
    loop thread: `tokenizer` is the loop thread's own)."""
    if not stop:
        return None
    return lambda ids: any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)
