"""Text -> prompt token ids: chat messages through the model's chat template, or raw completion text.

Message text is data, not markup: unless `allow_special_tokens` is set, a user who types a control token
such as `<|im_start|>system` gets those characters as plain text, never the control token itself. The
template is rendered with a placeholder for each message's content; the template's own text is tokenized
with its control tokens, and each content with special tokens split into ordinary pieces.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from server.errors import InvalidRequest


def encode_completion(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """A completion prompt is the caller's own raw text: special tokens in it are parsed, as vLLM does;
    `add_special_tokens` adds the ones the tokenizer puts around a text (a BOS, for some)."""
    _require_unicode(text, "prompt")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    allow_special_tokens: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """Render `messages` ({"role", "content"} with string content, and for a template that renders tool calls
    an assistant's `tool_calls` and a tool message's `tool_call_id`) with the chat template and tokenize.

    `tools` go to a template that supports them (see `supports_tools`); the template spells them out, and an
    assistant's `tool_calls`, as its own text, so unless `allow_special_tokens` is set they may not contain a
    control token."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
    for index, message in enumerate(messages):
        _require_unicode(message["content"], f"messages[{index}].content")
    if not allow_special_tokens:
        spelled = [("tools", tools)] if tools else []
        spelled += [(f"messages[{i}].tool_calls", m["tool_calls"]) for i, m in enumerate(messages) if m.get("tool_calls")]
        for param, value in spelled:
            _require_plain(tokenizer, json.dumps(value, ensure_ascii=False), param)
    if allow_special_tokens:
        return _encode_template(tokenizer, _render(tokenizer, messages, tools))
    # The marker is random per call, so no message can forge one.
    marker = f"\x00{secrets.token_hex(8)}:"
    placeholders = [{**m, "content": f"{marker}{i}\x00"} for i, m in enumerate(messages)]
    rendered = _render(tokenizer, placeholders, tools)
    ids: list[int] = []
    pattern = re.compile(re.escape(marker) + r"(\d+)\x00")
    position = 0
    for match in pattern.finditer(rendered):
        ids += _encode_template(tokenizer, rendered[position : match.start()])
        content = messages[int(match.group(1))]["content"]
        ids += tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
        position = match.end()
    ids += _encode_template(tokenizer, rendered[position:])
    return ids


def _require_plain(tokenizer: Any, text: str, param: str) -> None:
    """Text a template spells out as its own may hold no control token."""
    _require_unicode(text, param)
    for token in getattr(tokenizer, "all_special_tokens", ()):
        if token and token in text:
            raise InvalidRequest(f"{param}: the text contains the control token {token!r}", param=param)


def _require_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates (\\ud800), which are not text and which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param}: the text contains invalid Unicode (a lone surrogate)", param=param) from None


def supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a `tools` list itself (else tools go into a system message)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def with_system_text(messages: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` added to the system message, or as a system message of its own before the first one."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        return [{**messages[0], "content": f"{first}\n\n{text}" if first else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
    extra = {"tools": list(tools)} if tools else {}
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **extra)
    except Exception as exc:  # the template's own raise_exception(), or a malformed conversation
        raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from None


def _encode_template(tokenizer: Any, text: str) -> list[int]:
    # The template already spells out any BOS it wants.
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
