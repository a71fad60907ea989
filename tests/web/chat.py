"""Driving the chat page as a person would: open it, type, send, wait for the answer; and reading back what
the page sent, from the browser's own network log."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # playwright may be missing: the tests that need it skip themselves
    from playwright.sync_api import Page, Request

CHAT = "/v1/chat/completions"
# The header's line about the last answer.
STATS = re.compile(r"^\d+ tokens · first token \d+\.\d\d s · \d+\.\d tok/s$")
ANSWER_TIMEOUT_MS = 120_000


@dataclass
class SentRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: Any


@dataclass
class NetworkLog:
    """Every request the page made, in order."""

    requests: list[SentRequest] = field(default_factory=list)

    def record(self, request: Request) -> None:
        body = request.post_data
        parsed = json.loads(body) if body and "json" in request.headers.get("content-type", "") else body
        self.requests.append(SentRequest(request.method, request.url, request.headers, parsed))

    @property
    def chats(self) -> list[SentRequest]:
        return [r for r in self.requests if r.method == "POST" and r.url.endswith(CHAT)]


def record_network(page: Page) -> NetworkLog:
    log = NetworkLog()
    page.on("request", log.record)
    return log


def open_chat(page: Page, url: str, model: str | None = "tiny") -> None:
    """Load the page and, unless the server wants a key, wait until it shows the served model's name."""
    page.goto(url + "/")
    if model is not None:
        page.wait_for_function("m => document.getElementById('model').textContent === m", arg=model)


def set_setting(page: Page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def send(page: Page, text: str) -> None:
    """Type a message and press Enter, as a person would; returns once the answer has begun (it may be over
    already: a short one can come and go between two looks at the Stop button)."""
    before = page.locator(".message.assistant").count()
    page.click("#input")
    page.keyboard.insert_text(text)
    page.keyboard.press("Enter")
    page.wait_for_function("n => document.querySelectorAll('.message.assistant').length > n", arg=before)


def wait_answer_done(page: Page) -> None:
    page.wait_for_selector("#send", state="visible", timeout=ANSWER_TIMEOUT_MS)


def answers(page: Page) -> list[str]:
    return page.locator(".message.assistant .content").all_inner_texts()


def last_answer_length(page: Page) -> int:
    return page.evaluate(
        "() => { const all = document.querySelectorAll('.message.assistant .content');"
        " return all.length ? all[all.length - 1].textContent.length : 0; }"
    )


def last_note(page: Page) -> str:
    return page.locator(".message.assistant").last.locator(".note").inner_text()


def stored_conversations(page: Page) -> list[dict[str, Any]]:
    return page.evaluate("() => JSON.parse(localStorage.getItem('tokenferry.conversations') || '[]')")


def sse(*payloads: dict[str, Any] | str) -> str:
    """A crafted event stream, as the server would frame it."""
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads)


def delta(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def assert_inert(page: Page) -> None:
    """Nothing hostile became markup: no image, script or svg element, no javascript: link, nothing ran."""
    for tag in ("img", "script", "svg", "iframe"):
        assert page.locator(f"#messages {tag}").count() == 0, tag
    assert page.locator("#messages [onerror], #messages [onload], #messages [onmouseover]").count() == 0
    hrefs = page.eval_on_selector_all("#messages a", "links => links.map(a => a.getAttribute('href'))")
    assert all(href.startswith(("https://", "http://")) for href in hrefs), hrefs
    assert page.evaluate("() => window.pwned") is None
