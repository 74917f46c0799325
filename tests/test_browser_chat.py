"""The customer chat in a real headless Chromium: the welcome, example questions and disclaimer show,
a clicked example is asked and shown at once with a typing mark before its first token, and a
refusal is a chat message with the draft kept, not a red toast."""

from __future__ import annotations

import threading

import pytest

import app
from assistant.chat import ScriptedBackend
from test_app import serve_scripted
from test_browser import CHROMIUM, TIMEOUT_MS, browser  # noqa: F401  (browser: the fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


def test_welcome_example_typing_mark_and_refusal_in_the_chat(browser, tuneloop_home):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    release = threading.Event()

    def slow_reply(question: str) -> str:
        release.wait(30)
        return f"Answer to {question}"

    settings = dict(welcome="Welcome to the bank chat.", examples="What are your hours? | What are the fees?",
                    disclaimer="Answers may be wrong; staff review them.", max_input_chars=20)
    with serve_scripted(backend=ScriptedBackend(reply=slow_reply), **settings) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served.url)
        expect(page.get_by_text("Welcome to the bank chat.")).to_be_visible()
        expect(page.get_by_text("Answers may be wrong; staff review them.")).to_be_visible()
        page.get_by_role("button", name="What are your hours?").click()
        chat = page.locator("[data-testid='chatbot'], .bubble-wrap").first
        expect(chat.get_by_text("What are your hours?")).to_be_visible()
        expect(chat.get_by_text(app.TYPING, exact=True)).to_be_visible()  # before any token exists
        release.set()
        expect(chat.get_by_text("Answer to What are your hours?")).to_be_visible()
        expect(chat.get_by_text(app.TYPING, exact=True)).to_have_count(0)
        expect(page.get_by_text("Welcome to the bank chat.")).to_have_count(0)

        box = page.get_by_placeholder("Ask a question")
        box.fill("x" * 21)
        page.get_by_role("button", name="Send", exact=True).click()
        expect(chat.get_by_text("the limit is 20", exact=False)).to_be_visible()
        expect(box).to_have_value("x" * 21)  # the draft is kept to shorten and send again
        assert page.locator(".toast-body, [data-testid='toast-body']").count() == 0
        assert served.rows("SELECT question, status FROM turns") == [("What are your hours?", "complete")]
