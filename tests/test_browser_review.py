"""The staff review queue (issue 26) in a real headless Chromium: save-and-next through three items
(buttons and keyboard), an unchanged correction refused, the label taxonomy (an existing label, and a
new one through the deliberate "new label…" step), and the filters and paging over 500 answers.

The answers are put straight into SQLite through their owner modules (feedback.turns, feedback.store)
and then reviewed only through the page.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

import app
from feedback import examples, store, turns
from feedback.db import connect
from test_app import STAFF_PASSWORD, serve_scripted
from test_browser import CHROMIUM, TIMEOUT_MS, browser  # noqa: F401  (the browser fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]
MANY = store.VoteLimits(per_session=10_000, per_address=10_000, overall=10_000)


def answered(db, session: str, question: str, answer: str, adapter: str | None = None) -> int:
    turn_id = turns.start_turn(db, session, question, [], "base")
    turns.finish_turn(db, turn_id, answer, SimpleNamespace(adapter=adapter, latency_s=0.1, first_token_s=0.01,
                                                           tokens_in=5, tokens_out=3))
    return turn_id


def signed_in_page(browser, served):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.url + app.STAFF_LOGIN_PATH)
    page.get_by_label("Staff name").fill("alice")
    page.get_by_label("Password").fill(STAFF_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_label("Signed in as")).to_have_value("alice")
    return page


def test_save_and_next_through_three_items_and_an_unchanged_correction_refused(browser, tuneloop_home):
    from playwright.sync_api import expect

    db = connect()
    session = turns.new_session(db)
    ids = [answered(db, session, f"Question {i}?", f"Wrong answer number {i}.") for i in range(3)]
    for turn_id in ids:
        store.log_vote(db, session, turn_id, "down", f"reason {turn_id}", MANY)
    with serve_scripted() as served:
        page = signed_in_page(browser, served)
        given = page.get_by_label("The answer given")
        corrected = page.get_by_label("Corrected answer")
        page.get_by_role("button", name="Skip", exact=True).click()  # from nothing: the first item
        expect(given).to_have_value("Wrong answer number 2.")
        expect(corrected).to_have_value("")  # starts empty; the answer is beside it
        expect(page.get_by_label("Customer rating")).to_have_value(f"thumbs-down: reason {ids[2]}")
        page.get_by_role("button", name="Skip", exact=True).click()
        expect(given).to_have_value("Wrong answer number 1.")
        page.keyboard.press("Alt+ArrowLeft")  # Previous, by keyboard
        expect(given).to_have_value("Wrong answer number 2.")

        corrected.fill("  Wrong answer\nnumber 2. ")
        page.get_by_role("button", name="Save and next").click()
        expect(page.get_by_text("The correction is the same as the answer").first).to_be_visible()
        expect(given).to_have_value("Wrong answer number 2.")
        assert served.rows("SELECT count(*) FROM corrections") == [(0,)]

        corrected.fill("Right answer number 2.")
        expect(page.locator("#review-diff del")).to_have_text("Wrong")
        expect(page.locator("#review-diff ins")).to_have_text("Right")
        page.get_by_role("button", name="Save and next").click()
        expect(given).to_have_value("Wrong answer number 1.")
        expect(corrected).to_have_value("")
        corrected.fill("Right answer number 1.")
        page.keyboard.press("Alt+Enter")  # Save and next, by keyboard
        expect(given).to_have_value("Wrong answer number 0.")
        corrected.fill("Right answer number 0.")
        page.get_by_role("button", name="Save and next").click()
        expect(page.get_by_label("Result")).to_have_value(f"Correction 3 saved for answer {ids[0]}.")
        expect(page.get_by_label("Customer rating")).to_have_value("Nothing left in this queue.")
        expect(page.locator("#review-queue-note")).to_contain_text("0 answers match")

    assert served.rows("SELECT turn_id, answer, staff_user FROM corrections ORDER BY id") == [
        (ids[2], "Right answer number 2.", "alice"), (ids[1], "Right answer number 1.", "alice"),
        (ids[0], "Right answer number 0.", "alice")]
    assert served.rows("SELECT turn_id, action, staff_user FROM review_actions ORDER BY id") == [
        (ids[2], "correction", "alice"), (ids[1], "correction", "alice"), (ids[0], "correction", "alice")]


def test_labels_from_the_taxonomy_and_a_new_label_as_a_deliberate_step(browser, tuneloop_home):
    from playwright.sync_api import expect

    db = connect()
    examples.import_rows(db, [{"question": "Stock tips?", "answer": "We cannot advise.", "label": "out-of-scope"},
                              {"question": "Lost card?", "answer": "Block it in the app.", "label": "cards"}])
    session = turns.new_session(db)
    first = answered(db, session, "Which shares should I buy?", "Buy bank shares.")
    second = answered(db, session, "Can I get a mortgage?", "No.")
    with serve_scripted() as served:
        page = signed_in_page(browser, served)
        labels = page.get_by_label("Product / intent label (optional)")
        new_label = page.get_by_role("textbox", name="New label", exact=True)
        page.get_by_role("button", name="Skip", exact=True).click()
        expect(page.get_by_label("The answer given")).to_have_value("No.")
        expect(new_label).to_be_hidden()
        labels.click()
        expect(page.get_by_role("option", name="cards")).to_be_visible()  # the imported data's labels
        page.get_by_role("option", name="new label…").click()
        expect(new_label).to_be_visible()
        new_label.fill("Out_of scope")
        page.get_by_label("Corrected answer").fill("Yes, after an assessment of your income.")
        page.get_by_role("button", name="Save correction").click()
        expect(page.get_by_text("'Out_of scope' is the existing label 'out-of-scope'").first).to_be_visible()
        assert served.rows("SELECT count(*) FROM corrections") == [(0,)]
        new_label.fill("mortgages")
        page.get_by_role("button", name="Save correction").click()
        expect(page.get_by_label("Result")).to_have_value(re.compile(rf"Correction \d+ saved for answer {second}\."))

        page.get_by_role("button", name="Skip", exact=True).click()
        expect(page.get_by_label("The answer given")).to_have_value("Buy bank shares.")
        expect(new_label).to_be_hidden()
        labels.click()
        labels.fill("scope")
        page.get_by_role("option", name="out-of-scope").click()
        page.get_by_label("Corrected answer").fill("We cannot advise on shares.")
        page.get_by_role("button", name="Save correction").click()
        expect(page.get_by_label("Result")).to_have_value(re.compile(rf"Correction \d+ saved for answer {first}\."))
    assert served.rows("SELECT turn_id, label FROM corrections ORDER BY id") == [
        (second, "mortgages"), (first, "out-of-scope")]


def test_filters_and_paging_over_500_answers(browser, tuneloop_home):
    from playwright.sync_api import expect

    db = connect()
    customer, cli = turns.new_session(db), turns.new_session(db, kind="cli")
    ids = []
    for i in range(500):
        session = cli if i % 25 == 0 else customer  # 20 turns of `tuneloop ask`
        ids.append(answered(db, session, f"Question {i}?", f"Answer {i}.", adapter="v2" if i % 2 else None))
    downs = [turn_id for i, turn_id in enumerate(ids) if i % 5 == 1]  # 100 thumbs-down, all customers'
    for turn_id in downs:
        store.log_vote(db, customer, turn_id, "down", None, MANY)
    with serve_scripted() as served:
        page = signed_in_page(browser, served)
        note = page.locator("#review-queue-note")
        table = page.get_by_role("grid", name="Dataframe")
        expect(note).to_contain_text("Page 1 of 10: 480 answers match the filters.")
        expect(note).to_contain_text("thumbs-down: 100")
        page.get_by_label("show CLI/test turns").check()
        expect(note).to_contain_text("Page 1 of 10: 500 answers match the filters.")
        page.get_by_label("show CLI/test turns").uncheck()
        page.get_by_label("thumbs-down only").check()
        expect(note).to_contain_text("Page 1 of 2: 100 answers match the filters.")
        expect(table.get_by_role("gridcell", name=str(downs[-1]), exact=True)).to_be_visible()
        page.get_by_role("button", name="Older").click()
        expect(note).to_contain_text("Page 2 of 2: 100 answers match the filters.")
        expect(table.get_by_role("gridcell", name=str(downs[49]), exact=True)).to_be_visible()
        expect(table.get_by_role("gridcell", name=str(downs[50]), exact=True)).to_have_count(0)
        page.get_by_label("Adapter version ('base' for the base model)").fill("v2")
        # Every thumbs-down is an odd-numbered answer (i % 5 == 1 -> i odd only half the time).
        expected = sum(1 for i in range(500) if i % 5 == 1 and i % 2)
        expect(note).to_contain_text(f"Page 1 of 1: {expected} answers match the filters.")
        page.get_by_label("To day (YYYY-MM-DD)").fill("2000-01-01")
        expect(note).to_contain_text("Page 1 of 1: 0 answers match the filters.")
