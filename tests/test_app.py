"""The real Gradio app on 127.0.0.1, driven through gradio_client with the scripted backend:
chat, votes, staff sign-in and corrections, adapter swaps, and 20 customers at once."""

from __future__ import annotations

import socket
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from gradio_client import Client

import app
from assistant import adapters, paths
from assistant.chat import ChatService, ScriptedBackend
from assistant.config import ServeConfig
from feedback import auth
from feedback.db import ThreadLocalDB, connect

STAFF_PASSWORD = "correct horse battery"
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix, and noisy.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@dataclass
class Served:
    url: str
    backend: ScriptedBackend
    demo: object = None

    def client(self, cookie: str | None = None) -> Client:
        headers = {"Cookie": f"{app.STAFF_COOKIE}={cookie}"} if cookie else None
        return Client(self.url, verbose=False, download_files=False, headers=headers)

    def sign_in(self, name: str = "alice", password: str = STAFF_PASSWORD) -> httpx.Response:
        """POST the staff sign-in form, as the browser does (no redirect followed)."""
        return httpx.post(f"{self.url}{app.STAFF_LOGIN_PATH}", data={"name": name, "password": password}, timeout=30)

    def staff_client(self, name: str = "alice", password: str = STAFF_PASSWORD) -> Client:
        """A gradio_client that carries a signed-in staff member's session cookie."""
        response = self.sign_in(name, password)
        assert response.status_code == 303, response.text
        return self.client(response.cookies[app.STAFF_COOKIE])

    def rows(self, sql: str, params=()) -> list[tuple]:
        with sqlite3.connect(paths.feedback_db()) as conn:
            return conn.execute(sql, params).fetchall()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_scripted(delay_s: float = 0.0, concurrency: int = 4, max_input_chars: int = 2000,
                   backend: ScriptedBackend | None = None, **settings):
    """The app on a free 127.0.0.1 port with a scripted backend and one staff user, closed after;
    ``settings`` are further ServeConfig fields."""
    auth.add_staff(connect(), "alice", STAFF_PASSWORD)
    backend = backend or ScriptedBackend(delay_s=delay_s)
    cfg = ServeConfig(concurrency=concurrency, max_input_chars=max_input_chars, **settings)
    demo = app.build_app(ChatService(cfg, backend), ThreadLocalDB(), "scripted-base")
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), concurrency, block=False)
    try:
        yield Served(url.rstrip("/"), backend, demo)
    finally:
        demo.close()


@pytest.fixture
def served(tuneloop_home):
    with serve_scripted(delay_s=0.01) as running:
        yield running


def ask(client: Client, question: str) -> int:
    """Send one question; returns the logged turn id."""
    _history, _box, turn_id = client.predict(question, api_name="/chat")
    return int(turn_id)


def fake_adapter(version: str) -> None:
    folder = adapters.adapter_path(version)
    folder.mkdir(parents=True)
    (folder / adapters.WEIGHTS_FILE).write_bytes(b"scripted backend never reads these")


def test_chat_streams_and_logs_the_turn_with_its_adapter(served):
    client = served.client()
    job = client.submit("How do I reset my PIN?", api_name="/chat")
    updates = list(job)
    assert len(updates) > 2, "the answer should arrive in pieces"
    history, _box, turn_id = job.result()
    # The box is cleared when the question is taken and left alone after (a draft typed meanwhile stays).
    assert updates[0][1] == "" and all(box == {"__type__": "update"} for _, box, _ in updates[1:])
    assert history[-1]["content"][0]["text"] == "You asked: How do I reset my PIN?"
    (row,) = served.rows("SELECT question, answer, adapter, base_model, status FROM turns WHERE id = ?", [turn_id])
    assert row == ("How do I reset my PIN?", "You asked: How do I reset my PIN?", None, "scripted-base", "complete")


def test_switching_the_adapter_changes_what_the_next_turn_records(served):
    client = served.client()
    before = ask(client, "first")
    fake_adapter("v-test-1")
    adapters.set_current("v-test-1", reason="test")
    after = ask(client, "second")
    adapters.set_current(None, reason="back to base")
    last = ask(client, "third")
    recorded = dict(served.rows("SELECT id, adapter FROM turns"))
    assert (recorded[before], recorded[after], recorded[last]) == (None, "v-test-1", None)


def test_customer_votes_and_refusals(served):
    customer, other = served.client(), served.client()
    turn_id = ask(customer, "Are branches open on Sunday?")
    assert "staff will review" in customer.predict(turn_id, "down", "They are closed", api_name="/vote")
    assert "Thanks" in customer.predict(turn_id, "up", "", api_name="/vote")
    assert served.rows("SELECT value, reason, flagged FROM votes WHERE turn_id = ? ORDER BY id", [turn_id]) == [
        (-1, "They are closed", 0), (1, None, 0)]
    with pytest.raises(Exception, match=f"no answer {turn_id} in this conversation"):
        other.predict(turn_id, "down", "", api_name="/vote")
    with pytest.raises(Exception, match="no answer 424242 in this conversation"):
        customer.predict(424242, "down", "", api_name="/vote")
    with pytest.raises(Exception, match="'up' or 'down'"):
        customer.predict(turn_id, "meh", "", api_name="/vote")
    with pytest.raises(Exception, match="the limit is 500"):
        customer.predict(turn_id, "down", "x" * 501, api_name="/vote")
    assert len(served.rows("SELECT id FROM votes")) == 2


def test_empty_and_oversized_messages_are_refused(tuneloop_home):
    with serve_scripted(max_input_chars=50) as running:
        client = running.client()
        with pytest.raises(Exception, match="Please type a question"):
            client.predict("   ", api_name="/chat")
        with pytest.raises(Exception, match="the limit is 50"):
            client.predict("x" * 51, api_name="/chat")
        assert running.rows("SELECT count(*) FROM turns") == [(0,)]


def test_customers_cannot_reach_staff_actions(served):
    customer = served.client()
    turn_id = ask(customer, "question")
    staff_calls = [
        ((turn_id, "A better answer.", ""), "/correct"),
        ((turn_id, ""), "/approve"),
        (("Q?", "A.", ""), "/add_example"),
        ((), "/review_queue"),
        ((turn_id,), "/review_item"),
        ((turn_id,), "/reject"),
        ((turn_id,), "/undo"),
    ]
    for args, api_name in staff_calls:
        with pytest.raises(Exception, match="Staff only: sign in at /staff first"):
            customer.predict(*args, api_name=api_name)
    refused = served.sign_in("alice", "not the password")
    assert refused.status_code == 401 and "Wrong staff name or password" in refused.text
    assert app.STAFF_COOKIE not in refused.cookies
    with pytest.raises(Exception, match="Staff only"):
        customer.predict(turn_id, "A better answer.", "", api_name="/correct")
    assert served.rows("SELECT count(*) FROM corrections") == [(0,)]


def test_staff_review_correct_approve_and_add_example(served):
    customer = served.client()
    disliked = ask(customer, "What is the fee for <b>cards</b>?")
    fine = ask(customer, "Where is my nearest branch?")
    customer.predict(disliked, "down", "wrong fee", api_name="/vote")

    staff = served.staff_client()
    queue = staff.predict(api_name="/review_queue")
    assert queue["headers"] == app.QUEUE_HEADERS
    assert [row[0] for row in queue["data"]] == [disliked, fine]
    assert queue["data"][0][1:4] == ["down", "wrong fee", "What is the fee for <b>cards</b>?"]
    (shown_id, conversation, adapter, rating, answer, correction_box, _label, _diff, _new_label,
     references) = staff.predict(disliked, api_name="/review_item")
    assert shown_id == disliked and correction_box == ""  # the correction box starts empty
    assert answer == "You asked: What is the fee for <b>cards</b>?"
    assert conversation[-1]["content"][0]["text"] == "You asked: What is the fee for &lt;b&gt;cards&lt;/b&gt;?"
    assert adapter == "none (base model)" and rating == "thumbs-down: wrong fee"
    assert references.startswith("none")  # this server answers without a knowledge index

    assert "saved" in staff.predict(disliked, "Cards cost nothing.", "fees", api_name="/correct")
    assert "approved" in staff.predict(fine, "branches", api_name="/approve")
    assert "added" in staff.predict("Can I freeze my card?", "Yes, in the app.", "cards", api_name="/add_example")
    with pytest.raises(Exception, match="corrected answer is empty"):
        staff.predict(disliked, "  ", "", api_name="/correct")
    assert served.rows("SELECT turn_id, kind, answer, label, staff_user FROM corrections ORDER BY id") == [
        (disliked, "correction", "Cards cost nothing.", "fees", "alice"),
        (fine, "approval", "You asked: Where is my nearest branch?", "branches", "alice"),
        (None, "manual", "Yes, in the app.", "cards", "alice"),
    ]
    assert staff.predict(api_name="/review_queue")["data"] == []
    staff.predict(api_name="/staff_signout")
    with pytest.raises(Exception, match="sign in"):
        staff.predict(api_name="/review_queue")


def test_blind_review_marks_are_stored_through_the_apps_own_database(served):
    # The app migrates only feedback's tables; the review tables are among them (feedback owns both),
    # so staff can mark pairs the nightly job stored with feedback.review.add_review_pairs.
    from feedback import review

    review.add_review_pairs(connect(), "run1", [
        review.ReviewPair("Can I freeze my card?", "Yes.", "v1", "Yes, in the app.", None, "No."),
    ])
    staff = served.staff_client()
    pair_id, question, left, right, *_ = staff.predict(api_name="/review_next_pair")
    assert (question, left, right) == ("Can I freeze my card?", "Yes, in the app.", "No.")
    _pair, nothing_left, *_, shares = staff.predict(pair_id, True, False, api_name="/review_mark")
    assert nothing_left == "Nothing left to review." and "v1 100% of 1" in shares
    assert served.rows("SELECT side, staff_user, helpful FROM review_marks ORDER BY side") == [
        ("left", "alice", 1), ("right", "alice", 0)]


def test_html_in_messages_is_stored_verbatim_and_never_rendered_as_html(served):
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> **bold**'
    client = served.client()
    history, _box, turn_id = client.predict(payload, api_name="/chat")
    assert served.rows("SELECT question FROM turns WHERE id = ?", [turn_id]) == [(payload,)]
    # Displayed escaped (gr.Chatbot renders HTML even without Markdown), so it shows as typed ...
    shown = history[0]["content"][0]["text"]
    assert "<img" not in shown and shown.startswith("&lt;img src=x")
    # ... and the model sees the earlier turn exactly as typed, not the escaped copy.
    client.predict("and then?", api_name="/chat")
    assert served.backend.calls[-1][1] == {"role": "user", "content": payload}
    config = client.config
    chatbots = [c for c in config["components"] if c.get("type") == "chatbot"]
    assert len(chatbots) == 2  # the customer chat and the staff conversation view
    assert all(c["props"]["render_markdown"] is False and c["props"]["sanitize_html"] is True for c in chatbots)
    # Nothing of the customer's is shown through components that render Markdown or HTML, but the
    # staff word diff, whose words review.word_diff_html escapes (tests/test_review_queue.py), and
    # the keyboard shortcuts' empty binder.
    assert sorted(c["props"].get("elem_id") for c in config["components"] if c.get("type") == "html") == [
        "review-diff", "review-keys"]
    table = next(c for c in config["components"] if c.get("type") == "dataframe")
    assert table["props"]["datatype"] in ("str", ["str"] * len(app.QUEUE_HEADERS))


def test_twenty_concurrent_customers_lose_no_row(tuneloop_home):
    customers, questions_each = 20, 2
    # One address for all twenty: the per-address vote limit is raised so that every vote counts.
    with serve_scripted(delay_s=0.005, concurrency=8, votes_per_address_per_minute=1000) as running:
        errors: list[BaseException] = []

        def customer(index: int) -> None:
            try:
                client = running.client()
                for q in range(questions_each):
                    turn_id = ask(client, f"customer {index} question {q}")
                    client.predict(turn_id, "up" if (index + q) % 2 else "down", "", api_name="/vote")
            except BaseException as exc:  # reported below; a thread's exception would be lost
                errors.append(exc)

        threads = [threading.Thread(target=customer, args=(i,)) for i in range(customers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not errors, errors[:3]
        sent = customers * questions_each
        assert running.rows("SELECT count(*), count(DISTINCT session_id) FROM turns WHERE status = 'complete'") == [(sent, customers)]
        assert running.rows("SELECT count(*) FROM votes WHERE flagged = 0") == [(sent,)]
        questions = {q for (q,) in running.rows("SELECT question FROM turns")}
        assert questions == {f"customer {i} question {q}" for i in range(customers) for q in range(questions_each)}
