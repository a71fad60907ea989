"""The chat page in a real headless chromium against a live server on the tiny model (random tokens, which is
all streaming needs): streaming, history, Stop, hostile Markdown, errors, the API key, persistence."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import pytest

from bench.process import ServerProcess
from tests.conftest import API_KEY
from tests.web.chat import (
    CHAT,
    STATS,
    answers,
    assert_inert,
    delta,
    last_answer_length,
    last_note,
    open_chat,
    record_network,
    send,
    set_setting,
    sse,
    stored_conversations,
    wait_answer_done,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

pytestmark = pytest.mark.browser



def sample_while_streaming(page: Page, every_s: float = 0.05) -> list[int]:
    """The length of the answer's text, read from the DOM again and again until the answer is done."""
    lengths = []
    while page.locator("#stop").is_visible():
        lengths.append(last_answer_length(page))
        time.sleep(every_s)
    lengths.append(last_answer_length(page))
    return lengths


def test_an_answer_streams_in_and_the_next_turn_carries_the_history(page: Page, tiny_server: ServerProcess) -> None:
    network = record_network(page)
    open_chat(page, tiny_server.url)
    set_setting(page, "#max-tokens", "400")
    set_setting(page, "#temperature", "0")  # greedy: the same answers every run, whatever their length
    set_setting(page, "#system-prompt", "You are terse.")

    # Shift+Enter is a newline in the message; Enter sends it.
    page.click("#input")
    page.keyboard.insert_text("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.insert_text("there")
    assert page.input_value("#input") == "Hello\nthere" and not network.chats
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant")
    lengths = sample_while_streaming(page)
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3, f"the text should appear in steps, sampled lengths: {lengths}"
    assert growing == sorted(growing), lengths
    assert STATS.match(page.inner_text("#stats")), page.inner_text("#stats")

    send(page, "And a second turn?")
    wait_answer_done(page)
    first, second = network.chats
    assert first.body["stream"] is True and first.body["stream_options"] == {"include_usage": True}
    assert first.body["model"] == "tiny" and first.body["max_tokens"] == 400 and first.body["temperature"] == 0
    assert first.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello\nthere"},
    ]
    (conversation,) = stored_conversations(page)
    first_answer = conversation["messages"][1]["content"]
    assert first_answer and conversation["messages"][1]["role"] == "assistant"
    assert second.body["messages"] == [
        *first.body["messages"],
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And a second turn?"},
    ]
    assert "authorization" not in first.headers  # no key configured, none sent

    # Conversations survive a reload, and New chat starts an empty one beside them.
    shown = answers(page)
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert answers(page) == shown
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.locator("#conversations .open", has_text="Hello").click()
    assert answers(page) == shown


def test_stop_ends_the_stream_and_frees_the_row(page: Page, tiny_server: ServerProcess) -> None:
    before = tiny_server.outcomes(CHAT)
    open_chat(page, tiny_server.url)
    set_setting(page, "#max-tokens", "900")  # about 5 s of tokens on the tiny model: Stop lands mid-answer
    set_setting(page, "#temperature", "0")
    send(page, "Tell me a long story.")
    page.wait_for_function("() => document.querySelector('.message.assistant .content').textContent.length > 20")
    assert tiny_server.tracked()["running"] == 1

    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    time.sleep(0.3)  # a frame already queued may still paint what arrived before the Stop
    stopped_at = last_answer_length(page)
    time.sleep(1.0)
    assert last_answer_length(page) == stopped_at, "text kept arriving after Stop"
    assert last_note(page) == "Stopped."
    assert tiny_server.settle(timeout=10) == {"waiting": 0, "running": 0, "tracked": 0}
    assert tiny_server.counted_since(before, 1, CHAT) == {"cancelled": 1}
    (conversation,) = stored_conversations(page)
    assert conversation["messages"][1]["stopped"] is True and conversation["messages"][1]["content"]


HOSTILE = (
    'Look: <img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script> '
    "**bold** `<b>code</b>` [click](javascript:window.pwned=3) [ok](https://example.com/a?b=1&c=2)\n"
    '```html\n<img src=x onerror="window.pwned=4"></code></pre><script>window.pwned=5</script>\n```\n'
    '- <svg onload="window.pwned=6"></svg>\n'
    '- [x](https://a.example" onmouseover="window.pwned=7)'
)


def test_hostile_answers_render_as_text(page: Page, tiny_server: ServerProcess) -> None:
    """The tiny model cannot be made to say this, so page.route serves a crafted SSE stream in its place,
    cut mid-tag so that the partial renders are hostile too; then the same text comes back from localStorage."""
    pieces = [HOSTILE[i : i + 7] for i in range(0, len(HOSTILE), 7)]
    stream = sse(*(delta(p) for p in pieces), {"choices": [], "usage": {"completion_tokens": len(pieces)}}, "[DONE]")

    def crafted(route: Route) -> None:
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream)

    open_chat(page, tiny_server.url)
    page.route(f"**{CHAT}", crafted)
    send(page, '<img src=x onerror="window.pwned=8"> from the user')
    wait_answer_done(page)
    answer = page.locator(".message.assistant .content").last
    text = answer.inner_text()
    assert '<img src=x onerror="window.pwned=1">' in text and "<script>window.pwned=2</script>" in text
    assert '<img src=x onerror="window.pwned=4"></code></pre><script>' in answer.locator("pre code").inner_text()
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("code").first.inner_text() == "<b>code</b>"
    assert answer.locator("a").first.get_attribute("href") == "https://example.com/a?b=1&c=2"
    assert page.locator(".message.user").inner_text().startswith("<img src=x")
    assert_inert(page)

    page.reload()  # the stored conversation is rendered again from localStorage
    page.wait_for_selector(".message.assistant")
    assert page.locator(".message.assistant .content").inner_text() == text
    assert_inert(page)


RENDERER_CASES = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[a](javascript:alert(1))",
    '[a](https://x.example" onmouseover="alert(1))',
    '[a](https://x.example"onmouseover="alert(1)")',
    "[`<b>`](https://x.example/<script>)",
    "```\"><img src=x onerror=alert(1)>\n<script>alert(1)</script>",
    '```js" onload="alert(1)\ncode\n```',
    "**<svg onload=alert(1)>** *<iframe src=javascript:alert(1)>*",
    "# <h1>big</h1>\n> <blockquote onclick=alert(1)>\n1. <b>one</b>\n- <i>two</i>",
    "\u00000\u0000 forged slot `x` \u00001\u0000",
    "&lt;script&gt; stays &amp;lt; as typed",
]
ALLOWED_TAGS = {"P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "UL", "OL", "LI", "H3", "H4", "H5", "H6", "BLOCKQUOTE", "HR", "A"}
ALLOWED_ATTRIBUTES = {"href", "target", "rel", "class", "start"}


def test_the_markdown_renderer_never_emits_markup_of_its_own(page: Page, tiny_server: ServerProcess) -> None:
    open_chat(page, tiny_server.url)
    # Parsed into an inert <template>: nothing loads or runs while the output is inspected.
    elements = page.evaluate(
        """cases => cases.map(text => {
            const t = document.createElement('template');
            t.innerHTML = window.tokenferry.renderMarkdown(text);
            return [...t.content.querySelectorAll('*')].map(e => ({
                tag: e.tagName, attributes: Object.fromEntries([...e.attributes].map(a => [a.name, a.value]))}));
        })""",
        RENDERER_CASES,
    )
    for text, found in zip(RENDERER_CASES, elements, strict=True):
        for element in found:
            assert element["tag"] in ALLOWED_TAGS, (text, element)
            assert set(element["attributes"]) <= ALLOWED_ATTRIBUTES, (text, element)
            assert element["attributes"].get("href", "https://").startswith(("https://", "http://")), (text, element)
            assert re.fullmatch(r"(language-[\w+#.-]+)?", element["attributes"].get("class", "")), (text, element)
    plain = page.evaluate(
        "t => { const d = document.createElement('div'); d.innerHTML = window.tokenferry.renderMarkdown(t); return d.textContent; }",
        "a < b && c > d \"quoted\" 'single' &amp;",
    )
    assert plain == "a < b && c > d \"quoted\" 'single' &amp;"


def test_errors_are_shown_in_the_conversation(page: Page, tiny_server: ServerProcess) -> None:
    open_chat(page, tiny_server.url)

    # A prompt over the tiny model's 1024-token context: the real server's 400.
    send(page, "word " * 3000)
    wait_answer_done(page)
    assert "too long for the model's context" in last_note(page)

    # The rest cannot be provoked on demand from a healthy server, so page.route stands in for it.
    busy = {"error": {"message": "the waiting queue is full", "type": "rate_limit_error", "param": None, "code": None}}
    page.route(f"**{CHAT}", lambda route: route.fulfill(status=429, headers={"Retry-After": "1"}, json=busy))
    send(page, "Are you busy?")
    wait_answer_done(page)
    assert "Error 429" in last_note(page) and "retry in 1 s" in last_note(page)

    page.unroute(f"**{CHAT}")
    page.route(f"**{CHAT}", lambda route: route.abort("connectionrefused"))
    send(page, "Are you there?")
    wait_answer_done(page)
    assert "Cannot reach the server" in last_note(page)

    failed = sse(delta("Half an ans"), delta("wer"), {"error": {"message": "generation failed", "type": "internal_error"}}, "[DONE]")
    page.unroute(f"**{CHAT}")
    page.route(f"**{CHAT}", lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=failed))
    send(page, "Fail halfway.")
    wait_answer_done(page)
    assert answers(page)[-1] == "Half an answer"
    assert "error during the answer: generation failed" in last_note(page)
    assert page.locator(".note.error").count() == 4


def test_with_an_api_key_the_page_asks_for_it(page: Page, locked_server: ServerProcess) -> None:
    network = record_network(page)
    open_chat(page, locked_server.url, model=None)  # the page itself is open; /v1 is not
    page.wait_for_selector("#key-form", state="visible")
    assert "needs an API key" in page.inner_text("#key-prompt")
    set_setting(page, "#max-tokens", "64")  # this server runs one row at a time: keep answers short

    page.fill("#api-key", "wrong-key")
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('key-status').textContent.includes('401')")
    assert page.locator("#key-status").is_visible() and "wrong API key" in page.inner_text("#key-status")
    send(page, "Hello?")
    wait_answer_done(page)
    assert "Error 401" in last_note(page)

    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-form", state="hidden")
    assert page.inner_text("#model") == "tiny"
    # Not remembered: the key lives in this tab's sessionStorage only.
    assert page.evaluate("() => [sessionStorage.getItem('tokenferry.apiKey'), localStorage.getItem('tokenferry.apiKey')]") == [API_KEY, None]
    send(page, "Hello again")
    wait_answer_done(page)
    assert answers(page)[-1] and page.locator(".message.assistant").last.locator(".note").count() == 0

    sent = network.chats[-1]
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert not any(key in r.url for r in network.requests for key in (API_KEY, "wrong-key")), "a key leaked into a URL"


def test_on_a_phone_the_sidebar_folds_away(browser: Browser, tiny_server: ServerProcess) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        open_chat(page, tiny_server.url)
        sidebar = page.locator("#sidebar")
        assert sidebar.bounding_box()["x"] < 0  # off screen until asked for
        page.click("#menu")
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x === 0")
        page.mouse.click(370, 400)  # beside the sidebar, on the conversation
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        context.close()
