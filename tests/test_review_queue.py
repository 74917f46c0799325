"""The staff review queue at the store level (issue 26): filters and their counts, CLI turns hidden,
rejection and undo recorded with who and when, unchanged corrections refused, one label taxonomy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from feedback import auth, examples, review, store, turns
from feedback.db import connect


@pytest.fixture
def db(tuneloop_home):
    database = connect()
    yield database
    database.close()


@pytest.fixture
def staff(db) -> str:
    return auth.add_staff(db, "alice", "correct horse battery")


def answered(db, session: str, question: str, answer: str = "Use the app.", adapter: str | None = "v1") -> int:
    turn_id = turns.start_turn(db, session, question, [], "base")
    turns.finish_turn(db, turn_id, answer, SimpleNamespace(adapter=adapter, latency_s=0.1, first_token_s=0.01,
                                                           tokens_in=5, tokens_out=3))
    return turn_id


def queued(db, **filters) -> list[int]:
    return [item["turn_id"] for item in store.review_queue(db, 1, 100, store.QueueFilter(**filters))]


def test_filters_counts_and_hidden_cli_turns(db, staff):
    customer, cli = turns.new_session(db), turns.new_session(db, kind="cli")
    down = answered(db, customer, "Why was I charged twice?", "It is a fee.")
    up = answered(db, customer, "Opening hours?", "9 to 5.", adapter=None)
    plain = answered(db, customer, "Card lost?", "Call us.")
    from_cli = answered(db, cli, "A question from tuneloop ask")
    store.log_vote(db, customer, down, "down", "wrong")
    store.log_vote(db, customer, up, "up")
    assert queued(db) == [down, up, plain]  # the CLI turn is hidden by default
    assert queued(db, show_hidden=True) == [down, up, from_cli, plain]
    assert queued(db, thumbs_down=True) == [down]
    assert queued(db, adapter="base") == [up] and queued(db, adapter="v1") == [down, plain]
    store.record_correction(db, staff, down, "A double charge is refunded within 3 days.", "fees")
    assert queued(db) == [up, plain]
    assert queued(db, has_correction=True) == [] and queued(db, has_correction=True, not_reviewed=False) == [down]
    assert queued(db, label="fees", not_reviewed=False) == [down]
    assert store.review_counts(db) == {"all": 3, "thumbs_down": 1, "has_correction": 1, "not_reviewed": 2, "rejected": 0}
    assert store.review_counts(db, show_hidden=True)["all"] == 4
    today = turns.now()[:10]
    assert queued(db, since=today, until=today) == [up, plain] and queued(db, until="2000-01-01") == []
    assert store.review_queue_size(db, store.QueueFilter(not_reviewed=False)) == 3
    with pytest.raises(store.FeedbackError, match="YYYY-MM-DD"):
        store.QueueFilter(since="yesterday")
    with pytest.raises(store.FeedbackError, match="ends"):
        store.QueueFilter(since="2026-02-01", until="2026-01-01")


def test_paging_through_a_filtered_queue(db):
    session = turns.new_session(db)
    ids = [answered(db, session, f"question {i}") for i in range(120)]
    for turn_id in ids[::3]:
        store.log_vote(db, session, turn_id, "down", None, store.VoteLimits(per_session=1000, per_address=1000))
    pages = [queued_page for page in (1, 2, 3) for queued_page in
             [[i["turn_id"] for i in store.review_queue(db, page, 25, store.QueueFilter(thumbs_down=True))]]]
    assert [len(p) for p in pages] == [25, 15, 0]
    assert [t for p in pages for t in p] == sorted(ids[::3], reverse=True)
    assert store.review_queue_size(db, store.QueueFilter(thumbs_down=True)) == 40


def test_reject_and_undo_are_recorded_and_reject_never_trains(db, staff):
    session = turns.new_session(db)
    turn_id = answered(db, session, "Can I get a loan?", "Yes, always.")
    store.log_vote(db, session, turn_id, "up")
    store.reject(db, staff, turn_id)
    assert queued(db) == [] and store.review_counts(db)["rejected"] == 1
    assert store.export_rows(db, include_thumbs_up=True) == []  # rejected: not trained on, even as a thumbs-up
    undone = store.undo(db, staff, turn_id)
    assert undone["action"] == "rejection" and queued(db) == [turn_id]
    row = store.record_correction(db, staff, turn_id, "It depends on an assessment.")
    assert [r["id"] for r in store.export_rows(db)] == [row]
    with pytest.raises(store.FeedbackError, match="nothing to undo"):
        store.undo(db, auth.add_staff(db, "bob", "another long password"), turn_id)  # only your own actions
    assert store.undo(db, staff, turn_id)["action"] == "correction"
    assert store.export_rows(db) == [] and db["corrections"].count == 0 and queued(db) == [turn_id]
    actions = store.review_actions(db, turn_id)
    assert [(a["action"], a["staff_user"], a["undone_by"]) for a in actions] == [
        ("rejection", "alice", "alice"), ("correction", "alice", "alice")]
    assert all(a["created_at"] and a["undone_at"] for a in actions)
    with pytest.raises(store.FeedbackError, match="nothing to undo"):
        store.undo(db, staff, turn_id)


def test_an_unchanged_correction_is_refused(db, staff):
    turn_id = answered(db, turns.new_session(db), "Fees?", "The fee is  2 EUR.")
    with pytest.raises(store.FeedbackError, match="same as the answer"):
        store.record_correction(db, staff, turn_id, "The fee is 2 EUR.\n")
    assert db["corrections"].count == 0 and db["review_actions"].count == 0


def test_labels_come_from_the_data_and_variants_are_refused(db, staff):
    examples.import_rows(db, [{"question": "Stock tips?", "answer": "We cannot advise.", "label": "out-of-scope"},
                              {"question": "Lost card?", "answer": "Block it in the app.", "label": "cards"}])
    assert store.labels(db) == ["cards", "out-of-scope"]
    with pytest.raises(store.FeedbackError, match="existing label 'out-of-scope'"):
        store.check_new_label(db, "Out_of scope")
    assert store.check_new_label(db, " mortgages ") == "mortgages"
    turn_id = answered(db, turns.new_session(db), "Stocks?", "Buy them.")
    with pytest.raises(store.FeedbackError, match="existing label 'out-of-scope'"):
        store.record_correction(db, staff, turn_id, "We cannot advise on stocks.", "out_of_scope")
    store.record_correction(db, staff, turn_id, "We cannot advise on stocks.", "out-of-scope")
    assert store.labels(db) == ["cards", "out-of-scope"]


def test_next_and_previous_follow_the_queue_order(db):
    session = turns.new_session(db)
    first, second, third = (answered(db, session, f"q{i}") for i in range(3))
    store.log_vote(db, session, first, "down")
    order = queued(db)
    assert order == [first, third, second]
    assert store.queue_neighbour(db, None) == first
    assert store.queue_neighbour(db, first) == third and store.queue_neighbour(db, third) == second
    assert store.queue_neighbour(db, second) is None
    assert store.queue_neighbour(db, second, step=-1) == third and store.queue_neighbour(db, first, step=-1) is None


def test_the_word_diff_escapes_what_it_shows():
    shown = review.word_diff_html('The fee is <img src=x onerror="alert(1)"> waived.', "The fee is 2 EUR a month.")
    assert shown.startswith("The fee is <del>&lt;img src=x onerror=&quot;alert(1)&quot;&gt; waived.</del>")
    assert shown.endswith("<ins>2 EUR a month.</ins>") and "<img" not in shown
    assert review.word_diff_html("Same words.", "") == ""
