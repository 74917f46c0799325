"""A customer and a staff member in a real headless Chromium: ask, thumbs-down with a reason, sign
in at /staff (the HTML form at /staff/login), correct the answer; then the correction is read back
from SQLite, and neither Gradio's state nor the browser's storage holds the password or the session.

Set ``$TUNELOOP_SCREENSHOTS`` to a folder to keep screenshots of both views (the README uses them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import app
from test_app import STAFF_PASSWORD, serve_scripted

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TIMEOUT_MS = 20_000
# Read at import: the autouse home fixture clears every other TUNELOOP_* variable before a test runs.
SCREENSHOTS = os.environ.get("TUNELOOP_SCREENSHOTS")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def test_customer_thumbs_down_then_staff_correction(browser, tuneloop_home):
    from playwright.sync_api import expect

    # The first correction may load the embedding model (knowledge index): more than expect's 5 s.
    expect.set_options(timeout=TIMEOUT_MS)

    question = 'Is the <img src=x onerror="window.pwned=1"> card fee waived?'
    with serve_scripted(delay_s=0.01) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served.url)
        page.get_by_placeholder("Ask a question").fill(question)
        page.get_by_role("button", name="Send", exact=True).click()
        chat = page.locator(".bubble-wrap, [data-testid='chatbot']").first
        # The markup shows as the characters typed: no image element, no script run.
        expect(chat.get_by_text("You asked: " + question)).to_be_visible()
        assert page.get_by_text("Staff only").count() == 0  # the staff page's load event stays on its page
        assert chat.locator("img[src='x']").count() == 0
        assert page.evaluate("window.pwned") is None

        page.get_by_role("button", name="Dislike").last.click()
        expect(page.get_by_text("staff will review this answer")).to_be_visible()
        page.get_by_label("What was wrong with this answer?").fill("The fee is not waived.")
        page.get_by_role("button", name="Send reason").click()
        expect(page.get_by_label("What was wrong with this answer?")).to_be_hidden()
        screenshot(page, "chat.png")
        (turn_id,) = served.rows("SELECT id FROM turns")[0]
        assert served.rows("SELECT value, reason FROM votes WHERE turn_id = ? ORDER BY id", [turn_id]) == [
            (-1, None), (-1, "The fee is not waived.")]

        page.goto(served.url + "/staff")
        expect(page).to_have_url(re.compile(re.escape(app.STAFF_LOGIN_PATH) + "$"))
        expect(page.get_by_label("Corrected answer")).to_be_hidden()
        page.get_by_label("Staff name").fill("alice")
        page.get_by_label("Password").fill(STAFF_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_label("Signed in as")).to_have_value("alice")
        expect(page.get_by_label("Adapter serving now")).to_have_value(app.NO_ADAPTER_YET)
        (cookie,) = [c for c in page.context.cookies() if c["name"] == app.STAFF_COOKIE]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and page.evaluate("document.cookie") == ""
        table = page.get_by_role("grid", name="Dataframe")
        reason_cell = table.get_by_role("gridcell", name="The fee is not waived.")
        expect(reason_cell).to_be_visible()
        expect(table.get_by_role("gridcell", name=question, exact=True)).to_be_visible()
        assert table.locator("img[src='x']").count() == 0
        reason_cell.click()
        expect(page.get_by_label("Customer rating")).to_have_value("thumbs-down: The fee is not waived.")
        expect(page.get_by_label("Adapter that answered")).to_have_value("none (base model)")
        page.get_by_label("Corrected answer").fill("No: the card fee is 2 EUR a month.")
        page.get_by_label("Product / intent label (optional)").fill("card_fees")
        page.get_by_role("button", name="Save correction").click()
        expect(page.get_by_label("Result")).to_have_value(re.compile(r"Correction \d+ saved"))
        screenshot(page, "staff.png")
        assert page.evaluate("window.pwned") is None

        assert served.rows("SELECT turn_id, kind, question, answer, label, staff_user FROM corrections") == [
            (turn_id, "correction", question, "No: the card fee is 2 EUR a month.", "card_fees", "alice")]

        # Neither the browser's storage nor Gradio's server-side state holds the password or the session.
        stored = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
        state = repr([(s.config_values, s.state_data) for s in served.demo.state_holder.session_data.values()])
        for secret in (STAFF_PASSWORD, cookie["value"]):
            assert secret not in stored and secret not in state
        page.get_by_text("Sign out", exact=True).click()  # a link to /staff/logout
        expect(page).to_have_url(re.compile(re.escape(app.STAFF_LOGIN_PATH) + "$"))
        assert served.rows("SELECT count(*) FROM staff_sessions") == [(0,)]
