"""The customer chat in a real headless Chromium: the welcome, example questions and disclaimer show,
a clicked example is asked and shown at once with a typing mark before its first token, a
refusal is a chat message with the draft kept, not a red toast; Stop ends an answer and keeps what
was written; a question typed while an answer streams stays in the box until it is sent."""

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


LONG_REPLY = " ".join(f"word{i}" for i in range(60))


def chat_of(page):
    return page.locator("[data-testid='chatbot'], .bubble-wrap").first


def test_stop_keeps_the_partial_answer_logs_it_interrupted_and_frees_the_place(browser, tuneloop_home):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)

    def reply(question: str) -> str:
        return LONG_REPLY if question == "Tell me everything." else "Short answer."

    # One place in all: the next question is answered only if Stop gave the first one's place back.
    backend = ScriptedBackend(reply=reply, delay_s=0.2)
    with serve_scripted(backend=backend, concurrency=1, max_queue=0) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served.url)
        send, stop = page.get_by_role("button", name="Send", exact=True), page.get_by_role("button", name="Stop")
        expect(stop).to_be_hidden()
        page.get_by_placeholder("Ask a question").fill("Tell me everything.")
        send.click()
        chat = chat_of(page)
        expect(chat.get_by_text("word0 word1 word2", exact=False)).to_be_visible()
        expect(stop).to_be_visible()
        expect(send).to_be_hidden()
        stop.click()
        expect(send).to_be_visible()
        expect(stop).to_be_hidden()
        shown = chat.get_by_text("word0", exact=False).inner_text()
        page.wait_for_timeout(1500)  # seven more words' time: nothing more arrives
        assert chat.get_by_text("word0", exact=False).inner_text() == shown
        assert "word59" not in shown
        ((answer, status),) = served.rows("SELECT answer, status FROM turns")
        assert status == "interrupted" and answer.startswith("word0 word1 word2") and answer in LONG_REPLY
        # The log holds what was shown, or one piece more: the piece being generated when Stop came
        # is finished in its worker thread and logged, but Gradio no longer sends it to the page.
        assert answer.startswith(shown.strip()) and len(answer.split()) - len(shown.split()) <= 1

        page.get_by_placeholder("Ask a question").fill("And briefly?")
        send.click()
        expect(chat.get_by_text("Short answer.")).to_be_visible()
        assert served.rows("SELECT question, status FROM turns ORDER BY id") == [
            ("Tell me everything.", "interrupted"), ("And briefly?", "complete")]

        # Stopped before its first word: the typing mark goes, the question stays, nothing is answered.
        backend.delay_s = 2
        page.get_by_placeholder("Ask a question").fill("Anything else?")
        send.click()
        expect(chat.get_by_text(app.TYPING, exact=True)).to_be_visible()
        stop.click()
        expect(chat.get_by_text(app.TYPING, exact=True)).to_have_count(0)
        expect(chat.get_by_text("Anything else?")).to_be_visible()
        expect(send).to_be_visible()
        # The piece in the making when Stop came (here the first word, 2 s) ends the generator's run.
        for _ in range(100):
            ((answer, status),) = served.rows("SELECT answer, status FROM turns WHERE question = 'Anything else?'")
            if status != "streaming":
                break
            page.wait_for_timeout(100)
        assert status == "interrupted" and answer in ("", "Short")


def test_a_question_typed_while_an_answer_streams_stays_in_the_box_until_sent(browser, tuneloop_home):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)

    def reply(question: str) -> str:
        return " ".join(f"part{i}" for i in range(20)) if question == "First?" else "Second answer."

    with serve_scripted(backend=ScriptedBackend(reply=reply, delay_s=0.25)) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served.url)
        box = page.get_by_placeholder("Ask a question")
        box.fill("First?")
        box.press("Enter")
        chat = chat_of(page)
        expect(chat.get_by_text("part0 part1", exact=False)).to_be_visible()
        # Typed while the answer streams, then sent with Enter: refused visibly, kept in the box.
        box.fill("Second?")
        box.press("Enter")
        expect(page.get_by_text(app.ANSWERING_NOTE)).to_be_visible()
        expect(box).to_have_value("Second?")
        expect(chat.get_by_text("part19", exact=False)).to_be_visible()  # the whole first answer ...
        expect(page.get_by_text(app.ANSWERING_NOTE)).to_be_hidden()
        expect(box).to_have_value("Second?")  # ... and none of its updates wiped the draft
        assert served.rows("SELECT question FROM turns") == [("First?",)]
        assert chat.get_by_text("Second?", exact=True).count() == 0  # not asked behind the customer's back
        page.get_by_role("button", name="Send", exact=True).click()
        expect(chat.get_by_text("Second answer.")).to_be_visible()
        expect(box).to_have_value("")
        assert served.rows("SELECT question, status FROM turns ORDER BY id") == [
            ("First?", "complete"), ("Second?", "complete")]
