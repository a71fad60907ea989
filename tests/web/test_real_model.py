"""The chat page with the real default model (SmolLM2-135M): a two-turn conversation, and screenshots of it
mid-answer on a desktop and on a phone-sized screen, for a person to look at.

The screenshots land in the test's tmp_path; copies go to /tmp/tokenferry-chat.png,
/tmp/tokenferry-chat-phone.png and /tmp/tokenferry-chat-phone-menu.png, where they are easy to find (and
outlive pytest's rotation of its temporary folders).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from bench.process import ServerProcess
from tests.web.chat import (
    STATS,
    answers,
    assert_inert,
    last_answer_length,
    open_chat,
    send,
    set_setting,
    wait_answer_done,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP_COPY = Path("/tmp/tokenferry-chat.png")
PHONE_COPY = Path("/tmp/tokenferry-chat-phone.png")
PHONE_MENU_COPY = Path("/tmp/tokenferry-chat-phone-menu.png")
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


def test_a_conversation_with_the_real_model(page: Page, browser: Browser, smol_server: ServerProcess, tmp_path: Path) -> None:
    model = httpx.get(f"{smol_server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    open_chat(page, smol_server.url, model=model)
    set_setting(page, "#temperature", "0")
    set_setting(page, "#max-tokens", "96")  # enough for a code block and a list; this machine is slow

    send(page, "Write a Python function that adds two numbers.")
    wait_answer_done(page)
    assert answers(page)[-1].strip()
    assert STATS.match(page.inner_text("#stats")), page.inner_text("#stats")

    send(page, "List three things people carry on a ferry.")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant .content')[1].textContent.length > 60")
    desktop = tmp_path / "chat-desktop.png"
    page.screenshot(path=desktop)  # mid-conversation, the second answer still streaming
    shutil.copy(desktop, DESKTOP_COPY)
    wait_answer_done(page)
    assert last_answer_length(page) > 60
    page.screenshot(path=tmp_path / "chat-desktop-done.png")
    assert_inert(page)

    # The same conversation on a phone: it comes from localStorage, and nothing is wider than the screen.
    phone = browser.new_context(**PHONE, storage_state=page.context.storage_state())
    try:
        small = phone.new_page()
        open_chat(small, smol_server.url, model=model)
        small.wait_for_selector(".message.assistant")
        assert answers(small) == answers(page)
        assert STATS.match(small.inner_text("#stats"))  # the last answer's figures, kept with the conversation
        assert small.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        assert not small.locator("#sidebar").is_visible() or small.locator("#sidebar").bounding_box()["x"] < 0
        small.screenshot(path=tmp_path / "chat-phone.png")
        shutil.copy(tmp_path / "chat-phone.png", PHONE_COPY)
        small.click("#menu")
        small.wait_for_timeout(300)  # the sidebar slides in
        assert small.locator("#sidebar").bounding_box()["x"] == 0
        small.screenshot(path=tmp_path / "chat-phone-menu.png")
        shutil.copy(tmp_path / "chat-phone-menu.png", PHONE_MENU_COPY)
    finally:
        phone.close()
