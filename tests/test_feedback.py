"""Feedback capture at the store level, on a real SQLite file: votes, sign-in, corrections, review
queue, counts, export and the ``tuneloop staff`` / ``tuneloop feedback`` commands."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import timedelta
from types import SimpleNamespace

import pytest

from feedback import auth, store, turns
from feedback.db import connect


@pytest.fixture
def db(tuneloop_home):
    database = connect()
    yield database
    database.close()


def answered_turn(db, session_id: str, question: str = "How do I reset my PIN?", answer: str = "Use the app.") -> int:
    turn_id = turns.start_turn(db, session_id, question, [], "base")
    turns.finish_turn(db, turn_id, answer, SimpleNamespace(adapter="v1", latency_s=0.1, first_token_s=0.01, tokens_in=5, tokens_out=3))
    return turn_id


@pytest.fixture
def staff(db) -> str:
    return auth.add_staff(db, "alice", "correct horse battery")


def test_latest_vote_counts_and_every_vote_is_kept(db):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    store.log_vote(db, session, turn_id, "up")
    store.log_vote(db, session, turn_id, "down", "  wrong branch hours  ")
    counts = store.stats(db)
    assert (counts["up"], counts["down"]) == (0, 1)
    rows = list(db.query("SELECT value, reason FROM votes WHERE turn_id = ? ORDER BY id", [turn_id]))
    assert rows == [{"value": 1, "reason": None}, {"value": -1, "reason": "wrong branch hours"}]
    store.log_vote(db, session, turn_id, "up")
    assert (store.stats(db)["up"], store.stats(db)["down"]) == (1, 0)
    assert db["votes"].count == 3


def test_vote_on_another_sessions_turn_is_refused_like_a_missing_one(db):
    owner, stranger = turns.new_session(db), turns.new_session(db)
    turn_id = answered_turn(db, owner)
    with pytest.raises(store.FeedbackError, match=f"no answer {turn_id} in this conversation") as foreign:
        store.log_vote(db, stranger, turn_id, "down")
    with pytest.raises(store.FeedbackError, match="no answer 999 in this conversation") as missing:
        store.log_vote(db, owner, 999, "down")
    assert str(foreign.value).replace(str(turn_id), "N") == str(missing.value).replace("999", "N")
    assert db["votes"].count == 0


@pytest.mark.parametrize("value", ["sideways", 0, 2, True, None])
def test_bad_vote_values_are_refused(db, value):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    with pytest.raises(store.FeedbackError, match="'up' or 'down'"):
        store.log_vote(db, session, turn_id, value)


def test_oversized_reason_and_unfinished_answer_are_refused(db):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    with pytest.raises(store.FeedbackError, match=f"limit is {store.MAX_REASON_CHARS}"):
        store.log_vote(db, session, turn_id, "down", "x" * (store.MAX_REASON_CHARS + 1))
    streaming = turns.start_turn(db, session, "still answering?", [], "base")
    with pytest.raises(store.FeedbackError, match="not finished"):
        store.log_vote(db, session, streaming, "up")
    assert db["votes"].count == 0


def test_a_burst_of_votes_is_flagged_and_not_counted(db):
    session = turns.new_session(db)
    turn_ids = [answered_turn(db, session, f"question {i}") for i in range(store.VOTE_BURST_LIMIT + 5)]
    results = [store.log_vote(db, session, turn_id, "up") for turn_id in turn_ids]
    assert [r["flagged"] for r in results] == [False] * store.VOTE_BURST_LIMIT + [True] * 5
    assert db["votes"].count == len(turn_ids)  # flagged votes are kept as evidence
    counts = store.stats(db)
    assert counts["up"] == store.VOTE_BURST_LIMIT
    assert counts["flagged_votes"] == 5
    exported = {row["turn_id"] for row in store.export_rows(db, include_thumbs_up=True)}
    assert exported == set(turn_ids[: store.VOTE_BURST_LIMIT])
    assert store.export_rows(db) == []  # by default a thumbs-up trains only once staff approve it
    # Another session is not affected by this one's burst.
    other = turns.new_session(db)
    assert store.log_vote(db, other, answered_turn(db, other), "down")["flagged"] is False


def test_burst_window_passes(db, monkeypatch):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    for _ in range(store.VOTE_BURST_LIMIT):
        store.log_vote(db, session, turn_id, "up")
    later = store._utcnow() + timedelta(seconds=store.VOTE_BURST_WINDOW_S + 1)
    monkeypatch.setattr(store, "_utcnow", lambda: later)
    assert store.log_vote(db, session, turn_id, "down")["flagged"] is False


def test_password_is_stored_as_salted_argon2id_and_verifies(db, staff):
    stored = db["staff_users"].get("alice")["password_hash"]
    assert "correct horse battery" not in stored
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$") and not auth.needs_rehash(stored)
    assert auth.verify_password("correct horse battery", stored)
    assert not auth.verify_password("correct horse batterY", stored)
    assert not auth.verify_password("correct horse battery", "not a hash")
    assert auth.hash_password("same") != auth.hash_password("same")  # random salt
    assert auth.list_staff(db) == [{"name": "alice", "created_at": auth.list_staff(db)[0]["created_at"], "disabled": 0}]


def test_add_staff_refuses_bad_names_and_short_passwords(db):
    with pytest.raises(auth.AuthError, match="staff name"):
        auth.add_staff(db, "<script>", "long enough password")
    with pytest.raises(auth.AuthError, match="password is 8"):
        auth.add_staff(db, "bob", "short")
    assert db["staff_users"].count == 0


def test_sign_in_backs_off_per_name_and_address_without_locking_the_name(db, staff, monkeypatch):
    limits = auth.SigninLimits(hashes_per_minute=100, hashes_per_address_per_minute=100)
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", limits) == "alice"
    for _ in range(limits.backoff_after_failures):
        with pytest.raises(auth.AuthError, match="Wrong staff name or password"):
            auth.sign_in(db, "alice", "guess", "10.0.0.9", limits)
    # The guesser's address waits now, even with the right password; the refusal is not recorded ...
    with pytest.raises(auth.AuthError, match="try again in 1 seconds"):
        auth.sign_in(db, "alice", "correct horse battery", "10.0.0.9", limits)
    attempts = list(db.query("SELECT ok FROM signin_attempts WHERE name = 'alice' ORDER BY id"))
    assert [a["ok"] for a in attempts] == [1] + [0] * limits.backoff_after_failures
    # ... while alice, from her own address, is not locked out.
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", limits) == "alice"
    # Unknown names are recorded too and get the same message as a wrong password.
    with pytest.raises(auth.AuthError, match="Wrong staff name or password"):
        auth.sign_in(db, "mallory", "whatever1", "10.0.0.9", limits)
    later = auth._utcnow() + timedelta(seconds=2)
    monkeypatch.setattr(auth, "_utcnow", lambda: later)
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.9", limits) == "alice"


def test_sessions_expire_and_end_on_sign_out_password_change_and_disable(db, staff, monkeypatch):
    token = auth.create_session(db, "alice", ttl_s=60, address="10.0.0.1")
    assert len(token) >= 40 and auth.session_staff(db, token) == "alice"
    assert token not in json.dumps(list(db.query("SELECT * FROM staff_sessions")))  # only its hash is stored
    assert auth.session_staff(db, None) is None and auth.session_staff(db, token[:-1] + "x") is None
    auth.end_session(db, token)
    assert auth.session_staff(db, token) is None
    token = auth.create_session(db, "alice", ttl_s=60)
    auth.add_staff(db, "alice", "a new long password")
    assert auth.session_staff(db, token) is None
    token = auth.create_session(db, "alice", ttl_s=60)
    assert auth.disable_staff(db, "alice") == 1 and auth.session_staff(db, token) is None
    auth.add_staff(db, "alice", "a new long password")
    token = auth.create_session(db, "alice", ttl_s=60)
    later = auth._utcnow() + timedelta(seconds=61)
    monkeypatch.setattr(auth, "_utcnow", lambda: later)
    assert auth.session_staff(db, token) is None


def test_corrections_require_an_enabled_staff_user(db, staff):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    for who in (None, "", "mallory"):
        with pytest.raises(auth.AuthError, match="Staff only"):
            store.record_correction(db, who, turn_id, "Better answer.")
        with pytest.raises(auth.AuthError):
            store.approve(db, who, turn_id)
        with pytest.raises(auth.AuthError):
            store.add_example(db, who, "Q?", "A.")
    db["staff_users"].update("alice", {"disabled": 1})
    with pytest.raises(auth.AuthError):
        store.record_correction(db, "alice", turn_id, "Better answer.")
    assert db["corrections"].count == 0


def test_correction_approval_and_manual_example_rows(db, staff):
    session = turns.new_session(db)
    first, second = answered_turn(db, session, "Q1", "A1"), answered_turn(db, session, "Q2", "A2")
    store.record_correction(db, staff, first, "  Better A1.  ", "cards")
    store.approve(db, staff, second, "fees")
    store.add_example(db, staff, "Hand question?", "Hand answer.", None)
    rows = list(db.query("SELECT turn_id, kind, question, answer, label, staff_user FROM corrections ORDER BY id"))
    assert rows == [
        {"turn_id": first, "kind": "correction", "question": "Q1", "answer": "Better A1.", "label": "cards", "staff_user": "alice"},
        {"turn_id": second, "kind": "approval", "question": "Q2", "answer": "A2", "label": "fees", "staff_user": "alice"},
        {"turn_id": None, "kind": "manual", "question": "Hand question?", "answer": "Hand answer.", "label": None, "staff_user": "alice"},
    ]


def test_bad_corrections_are_refused_and_nothing_is_written(db, staff):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)
    with pytest.raises(store.FeedbackError, match="corrected answer is empty"):
        store.record_correction(db, staff, turn_id, "   ")
    with pytest.raises(store.FeedbackError, match=f"limit is {store.MAX_ANSWER_CHARS}"):
        store.record_correction(db, staff, turn_id, "x" * (store.MAX_ANSWER_CHARS + 1))
    with pytest.raises(store.FeedbackError, match="no answer 999"):
        store.record_correction(db, staff, 999, "Fine.")
    with pytest.raises(store.FeedbackError, match="label"):
        store.add_example(db, staff, "Q?", "A.", "l" * (store.MAX_LABEL_CHARS + 1))
    with pytest.raises(store.FeedbackError, match="Pick an answer"):
        store.approve(db, staff, None)
    interrupted = turns.start_turn(db, session, "cut off", [], "base")
    turns.finish_turn(db, interrupted, "Half an", SimpleNamespace(adapter=None, latency_s=0, first_token_s=None, tokens_in=1, tokens_out=1), "interrupted")
    with pytest.raises(store.FeedbackError, match="incomplete"):
        store.approve(db, staff, interrupted)
    assert db["corrections"].count == 0


def test_failed_write_leaves_nothing_half_written(db, staff, monkeypatch):
    session = turns.new_session(db)
    turn_id = answered_turn(db, session)

    real_insert = store._insert_correction

    def insert_then_fail(*args):
        real_insert(*args)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_insert_correction", insert_then_fail)
    with pytest.raises(sqlite3.OperationalError):
        store.record_correction(db, staff, turn_id, "Better.")
    assert db["corrections"].count == 0


def test_review_queue_puts_thumbs_down_first_and_drops_reviewed(db, staff):
    session = turns.new_session(db)
    liked, disliked, unrated, newer_unrated = (answered_turn(db, session, f"Q{i}") for i in range(4))
    store.log_vote(db, session, liked, "up")
    store.log_vote(db, session, disliked, "down", "wrong")
    queue = store.review_queue(db)
    # A thumbs-up waits for a staff approval too: no customer vote trains by itself.
    assert [item["turn_id"] for item in queue] == [disliked, liked, newer_unrated, unrated]
    assert store.review_queue_size(db) == 4
    assert queue[0]["vote"] == "down" and queue[0]["reason"] == "wrong" and queue[0]["adapter"] == "v1"
    assert store.stats(db)["pending_review"] == 1
    store.record_correction(db, staff, disliked, "Right answer.")
    store.approve(db, staff, unrated)
    assert [item["turn_id"] for item in store.review_queue(db)] == [liked, newer_unrated]
    assert store.stats(db)["pending_review"] == 0
    item = store.review_item(db, disliked)
    assert item["vote"] == "down" and [c["kind"] for c in item["corrections"]] == ["correction"]


def test_stats_numbers(db, staff):
    session = turns.new_session(db)
    ids = [answered_turn(db, session, f"Q{i}") for i in range(5)]
    store.log_vote(db, session, ids[0], "up")
    store.log_vote(db, session, ids[1], "down")
    store.log_vote(db, session, ids[2], "down")
    store.log_vote(db, session, ids[2], "up")
    store.record_correction(db, staff, ids[1], "Fixed.")
    store.add_example(db, staff, "Q?", "A.")
    assert store.stats(db) == {"turns": 5, "up": 2, "down": 1, "corrections": 2, "pending_review": 0, "flagged_votes": 0}


def test_export_is_chat_jsonl_of_gold_and_thumbs_up_only_if_asked(db, staff):
    session = turns.new_session(db)
    corrected, approved, liked, disliked, disliked_then_corrected = (
        answered_turn(db, session, f"Q{i}", f"A{i}") for i in range(5)
    )
    store.log_vote(db, session, corrected, "up")
    store.record_correction(db, staff, corrected, "first fix")
    store.record_correction(db, staff, corrected, "second fix")
    store.approve(db, staff, approved)
    store.log_vote(db, session, liked, "up")
    store.log_vote(db, session, disliked, "down")
    store.log_vote(db, session, disliked_then_corrected, "down")
    store.record_correction(db, staff, disliked_then_corrected, "gold")
    store.add_example(db, staff, "Manual Q", "Manual A")
    assert ("Q2", "A2") not in [(r["question"], r["answer"]) for r in store.export_rows(db)]
    lines = list(store.export_jsonl(db, "SYSTEM", include_thumbs_up=True))
    examples = [json.loads(line) for line in lines]
    assert all(set(example) == {"messages"} for example in examples)
    assert all([m["role"] for m in example["messages"]] == ["system", "user", "assistant"] for example in examples)
    assert all(example["messages"][0]["content"] == "SYSTEM" for example in examples)
    pairs = sorted((e["messages"][1]["content"], e["messages"][2]["content"]) for e in examples)
    assert pairs == sorted([("Q0", "second fix"), ("Q1", "A1"), ("Q2", "A2"), ("Q4", "gold"), ("Manual Q", "Manual A")])
    assert ("Q3", "A3") not in pairs


def test_staff_and_feedback_commands(db, monkeypatch, capsys, tmp_path):
    from tuneloop import cli
    from assistant.config import DEFAULT_SYSTEM_PROMPT

    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert cli.main(["staff", "add", "bob", "--password-stdin"]) == 0
    assert auth.sign_in(db, "bob", "a long password") == "bob"
    capsys.readouterr()
    assert cli.main(["staff", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in listed] == ["bob"] and "password_hash" not in listed[0]
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "typed password")
    assert cli.main(["staff", "add", "carol"]) == 0
    assert auth.sign_in(db, "carol", "typed password") == "carol"
    token = auth.create_session(db, "carol")
    assert cli.main(["staff", "disable", "carol"]) == 0
    assert auth.session_staff(db, token) is None and not auth.is_staff(db, "carol")
    assert cli.main(["staff", "disable", "nobody"]) == 2

    session = turns.new_session(db)
    turn_id = answered_turn(db, session, "Q", "A")
    store.log_vote(db, session, turn_id, "up")
    capsys.readouterr()
    assert cli.main(["feedback", "stats", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert {k: counts[k] for k in ("turns", "up", "down", "corrections", "pending_review")} == {
        "turns": 1, "up": 1, "down": 0, "corrections": 0, "pending_review": 0}
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["feedback"]["up"] == 1
    out = tmp_path / "out" / "examples.jsonl"
    assert cli.main(["feedback", "export", "--format", "jsonl", "--output", str(out)]) == 0
    assert out.read_text() == ""  # an unapproved thumbs-up is not training data
    assert cli.main(["feedback", "export", "--format", "jsonl", "--include-thumbs-up", "--output", str(out)]) == 0
    (example,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert example["messages"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert example["messages"][1:] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
