"""Issue 32, privacy: a customer's chat text is erased on request from everywhere it is stored, the
dataset snapshots on disk included, with a record that holds ids and no text; old turns nobody made
gold expire ([privacy] keep_days); ``tuneloop status`` names adapters trained on erased rows. Real
SQLite, real files, the real Gradio server on 127.0.0.1; every check greps the raw bytes of every
file under the home (database, WAL, snapshots, logs)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant import embeddings, paths
from feedback import curate, datasets, privacy, store, turns
from feedback.db import connect
from test_app import ask, fake_adapter, serve_scripted
from tuneloop import cli

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
CURATE = curate.CurateConfig(min_train_examples=1, warn_train_examples=1)
STATS = SimpleNamespace(adapter=None, latency_s=0.1, first_token_s=0.01, tokens_in=3, tokens_out=5)


@pytest.fixture(scope="module", autouse=True)
def embedder():
    return embeddings.load_embedder()


def files_holding(*texts: str) -> dict[str, list[str]]:
    """Text -> the files under the home whose raw bytes hold it (every file: db, -wal, snapshots, logs)."""
    found: dict[str, list[str]] = {}
    for file in sorted(paths.home().rglob("*")):
        if file.is_file():
            raw = file.read_bytes()
            for text in texts:
                if text.encode() in raw:
                    found.setdefault(text, []).append(str(file.relative_to(paths.home())))
    return found


def rows(sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(paths.feedback_db()) as conn:
        return conn.execute(sql, params).fetchall()


def answered(db, session_id: str, question: str, pairs=(), at: datetime | None = None) -> int:
    turn_id = turns.start_turn(db, session_id, question, list(pairs), "base")
    turns.finish_turn(db, turn_id, f"You asked: {question}", STATS)
    if at is not None:  # a turn logged that long ago
        with db.conn:
            db.execute("UPDATE turns SET created_at = ? WHERE id = ?", [at.isoformat(timespec="microseconds"), turn_id])
    return turn_id


def test_erasing_a_session_leaves_none_of_its_text_under_the_home(capsys):
    # Session A: two questions (the second's history holds the first), a thumbs-down with a reason,
    # a staff correction that went into a dataset snapshot. Session B: must stay whole.
    with serve_scripted() as served:
        customer = served.client()
        first = ask(customer, "Does the quokka marmalade account pay interest?")
        second = ask(customer, "And the wombat savings plan?")
        customer.predict(first, "down", "the platypus rate was wrong", api_name="/vote")
        other = ask(served.client(), "What are the echidna branch hours?")
        staff = served.staff_client()
        assert "saved" in staff.predict(first, "Numbat answer: 2% a year.", "rates", api_name="/correct")
        snapshot = curate.main(CURATE)
        assert any(row["answer"] == "Numbat answer: 2% a year." for row in datasets.load_split(snapshot.path, "train"))
        session_a, session_b = (rows("SELECT session_id FROM turns WHERE id = ?", [t])[0][0] for t in (first, other))
        assert rows("SELECT session_id FROM turns WHERE id = ?", [second]) == [(session_a,)]
        erased_texts = ("quokka", "wombat", "platypus", "Numbat")
        assert set(files_holding(*erased_texts)) == set(erased_texts)

        # Erased while the server runs, as it would be.
        assert cli.main(["privacy", "erase", "--session", session_a, "--by", "dpo-officer"]) == 0
        assert "erased session" in capsys.readouterr().out

        assert files_holding(*erased_texts) == {}
        assert "echidna" in files_holding("echidna")  # the other session is untouched
        assert rows("SELECT count(*) FROM turns WHERE session_id = ?", [session_b]) == [(1,)]
        assert rows("SELECT address FROM sessions WHERE id = ?", [session_a]) == [(None,)]
        assert "quokka" not in repr(staff.predict(api_name="/review_queue"))
        # The customer's open chat goes on: its next question starts from nothing erased.
        again = ask(customer, "Anything else?")
        assert rows("SELECT session_id, history FROM turns WHERE id = ?", [again]) == [(session_a, "[]")]
    (erasure,) = privacy.erasures(connect())
    correction_id = erasure["row_ids"][-1]
    assert (erasure["kind"], erasure["target"], erasure["turn_ids"], erasure["erased_by"]) == (
        "session", session_a, [first, second], "dpo-officer")
    assert erasure["row_ids"][:2] == [f"turns:{first}", f"turns:{second}"] and correction_id.startswith("corrections:")
    assert erasure["snapshots"] == [snapshot.version]
    # The snapshot still loads, its manifest tells what left it, and the database has its new hash.
    folder = Path(snapshot.path)
    manifest = datasets.load_manifest(folder)
    assert correction_id not in manifest["row_ids"]["train"]
    assert manifest["erased"] == [{"at": erasure["created_at"], "row_ids": {"train": [correction_id], "val": [], "test": []}}]
    assert manifest["counts"]["train"] == len(datasets.load_split(folder, "train"))
    assert rows("SELECT manifest_sha256, train FROM dataset_versions WHERE version = ?", [snapshot.version]) == [
        (paths.sha256_file(folder / "manifest.json"), manifest["counts"]["train"])]


def test_an_erasure_leaves_no_copy_in_the_database_files_even_from_writes_that_did_not_zero_what_they_freed():
    # Stock SQLite does not zero freed space (secure_delete is off unless built otherwise): an updated
    # row (history, answers) leaves its old version behind in the page. Measured here: with the
    # VACUUM taken out of privacy.scrub (secure_delete during the erase and a TRUNCATE checkpoint
    # only) this test found 12 copies of erased text in feedback.db; with it, none.
    db = connect()
    db.execute("PRAGMA secure_delete = OFF")
    sessions = []
    for s in range(6):
        session_id = turns.new_session(db, "customer", f"10.0.0.{s}")
        sessions.append(session_id)
        pairs = []
        for i in range(8):
            question = f"question marker-{s}-{i} " + "lorem ipsum " * 20
            turn_id = answered(db, session_id, question, pairs)
            store.log_vote(db, session_id, turn_id, "down", f"reason marker-{s}-{i}")
            pairs.append((question, f"You asked: {question}"))
    for session_id in sessions[::2]:
        assert privacy.erase(db, session_id=session_id).wal_cleared
    raw = b"".join(file.read_bytes() for file in paths.home().glob("feedback.db*"))
    assert sum(raw.count(f"marker-{s}-".encode()) for s in (0, 2, 4)) == 0
    assert all(raw.count(f"marker-{s}-".encode()) > 0 for s in (1, 3, 5))
    assert paths.feedback_db().with_name("feedback.db-wal").stat().st_size == 0


def test_erasing_one_turn_takes_it_out_of_the_later_turns_history():
    db = connect()
    session_id = turns.new_session(db, "customer")
    first = answered(db, session_id, "Is the kookaburra loan fixed?")
    pair = ("Is the kookaburra loan fixed?", "You asked: Is the kookaburra loan fixed?")
    second = answered(db, session_id, "And the dingo card?", [pair])
    erasure = privacy.erase(db, turn_id=first, erased_by="dpo")
    assert (erasure.kind, erasure.target, erasure.turn_ids) == ("turn", str(first), [first])
    assert rows("SELECT id, history FROM turns") == [(second, "[]")]
    assert files_holding("kookaburra", "dingo") == {"dingo": ["feedback.db"]}


def test_a_turn_erased_while_its_answer_streams_stays_erased():
    db = connect()
    session_id = turns.new_session(db, "customer")
    turn_id = turns.start_turn(db, session_id, "Is the wombat account open?", [], "base")
    privacy.erase(db, session_id=session_id, erased_by="dpo")
    turns.finish_turn(db, turn_id, "The wombat account is open.", STATS)  # the answer ends after the erasure
    assert rows("SELECT count(*) FROM turns") == [(0,)]
    assert files_holding("wombat") == {}


def test_erasing_an_api_session_takes_it_out_of_the_history_another_session_of_the_key_sent_back():
    # An API client sends the conversation back with each request, and each request is a session of
    # its own (feedback.api): a later session of the same key holds the erased pair in its history.
    db = connect()
    first_session = turns.new_session(db, "api", api_key="web")
    first = answered(db, first_session, "Is the tasmanian devil loan open?")
    pair = ("Is the tasmanian devil loan open?", "You asked: Is the tasmanian devil loan open?")
    later = answered(db, turns.new_session(db, "api", api_key="web"), "And the koala card?", [pair])
    privacy.erase(db, session_id=first_session)
    assert rows("SELECT id, history FROM turns ORDER BY id") == [(later, "[]")]
    assert files_holding("tasmanian", "koala") == {"koala": ["feedback.db"]}


def test_a_session_id_that_begins_with_a_dash_is_erased_by_the_command(monkeypatch, capsys):
    # Session ids are URL-safe base64: one in 64 begins with "-", which argparse takes for an option
    # unless the command joins the value to --session (it failed CI once that way).
    db = connect()
    monkeypatch.setattr(turns.secrets, "token_urlsafe", lambda n: "-Xq3x9TQ0nR8mYk2pLw7s1")
    session_id = turns.new_session(db, "customer")
    answered(db, session_id, "Where is the dibbler branch?")
    assert cli.main(["privacy", "erase", "--session", session_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == session_id
    assert rows("SELECT count(*) FROM turns") == [(0,)]


@pytest.mark.parametrize("argv, message", [
    (["--session", "no-such-session"], "tuneloop privacy erase: there is no session 'no-such-session'; nothing was erased\n"),
    (["--turn", "999"], "tuneloop privacy erase: there is no turn 999; nothing was erased\n"),
])
def test_an_unknown_id_is_refused_with_one_line_and_exit_2(capsys, argv, message):
    db = connect()
    answered(db, turns.new_session(db, "customer"), "Where is the bilby ATM?")
    assert cli.main(["privacy", "erase", *argv]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", message)
    assert rows("SELECT count(*) FROM turns") == [(1,)] and rows("SELECT count(*) FROM erasures") == [(0,)]


def test_retention_erases_old_turns_nobody_made_gold_and_keeps_gold_and_recent_ones(capsys):
    db = connect()
    store_user = "alice"
    from feedback import auth

    auth.add_staff(db, store_user, "correct horse battery")
    old = datetime.now(timezone.utc) - timedelta(days=40)
    session_id = turns.new_session(db, "customer", "10.9.9.9")
    with db.conn:
        db.execute("UPDATE sessions SET created_at = ? WHERE id = ?", [old.isoformat(), session_id])
    stale = answered(db, session_id, "Old galah question nobody reviewed", at=old)
    store.log_vote(db, session_id, stale, "down", "old cassowary complaint")
    corrected = answered(db, session_id, "Old lyrebird question staff corrected", at=old)
    approved = answered(db, session_id, "Old bandicoot question staff approved", at=old)
    store.record_correction(db, store_user, corrected, "Lyrebird staff answer.")
    store.approve(db, store_user, approved)
    recent = answered(db, turns.new_session(db, "customer"), "Recent possum question", at=old + timedelta(days=35))

    paths.config_file().write_text("[privacy]\nkeep_days = 30\n", encoding="utf-8")
    assert cli.main(["privacy", "expire"]) == 0
    assert capsys.readouterr().out == "tuneloop: 1 turn(s) older than 30 day(s) erased\n"
    assert [row[0] for row in rows("SELECT id FROM turns ORDER BY id")] == [corrected, approved, recent]
    assert files_holding("galah", "cassowary", "10.9.9.9") == {}
    assert set(files_holding("lyrebird", "Lyrebird staff", "bandicoot", "possum")) == {
        "lyrebird", "Lyrebird staff", "bandicoot", "possum"}
    (erasure,) = privacy.erasures(db)
    assert (erasure["kind"], erasure["turn_ids"], erasure["erased_by"]) == ("retention", [stale], "retention")
    # Nothing older is left: a second run erases nothing; keep_days 0 keeps everything.
    assert privacy.expire(db) == 0
    assert cli.main(["privacy", "expire", "--keep-days", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"keep_days": 0, "expired_turns": 0}


def test_the_retention_setting_is_checked():
    from assistant import config

    with pytest.raises(config.ConfigError, match="keep_days"):
        privacy.PrivacyConfig(keep_days=-1)
    assert privacy.PrivacyConfig().keep_days == 0


def test_status_names_the_adapters_trained_on_erased_rows_until_a_retrain_replaces_them(capsys):
    db = connect()
    from feedback import auth

    auth.add_staff(db, "alice", "correct horse battery")
    session_id = turns.new_session(db, "customer")
    kept = answered(db, session_id, "How do I order a cheque book?")
    erased = answered(db, session_id, "Can the emu account hold dollars?")
    store.approve(db, "alice", kept)
    store.record_correction(db, "alice", erased, "Yes, the emu account holds dollars.")

    def trained_on(version: str, snapshot: str) -> None:
        # What trainer.export leaves: the weights and a copy of the snapshot's manifest.
        fake_adapter(version)
        shutil.copyfile(Path(snapshot) / "manifest.json", paths.adapters_dir() / version / "dataset_manifest.json")

    trained_on("v-before", curate.main(CURATE).path)
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapters_with_erased_rows"] == []

    privacy.erase(db, turn_id=erased, erased_by="dpo")
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapters_with_erased_rows"] == ["v-before"]
    # The next retrain's snapshot holds no erased row, so its adapter is not named.
    trained_on("v-after", curate.main(CURATE).path)
    assert cli.main(["status"]) == 0
    assert "adapters_with_erased_rows: ['v-before']" in capsys.readouterr().out


def test_the_nightly_job_expires_old_turns_first_and_says_how_many(capsys):
    # A run on a snapshot a finished run already used stops before training: the real job, no model.
    from evals import schema
    from test_evals import write_snapshot

    from tuneloop import pipeline

    db = schema.connect()
    old = datetime.now(timezone.utc) - timedelta(days=10)
    answered(db, turns.new_session(db, "customer"), "Old kiwi question", at=old)
    snapshot = write_snapshot()
    db["retrain_runs"].insert({"status": "done", "stage": "end", "pid": 1, "started_at": "2026-01-01T00:00:00Z",
                               "dataset": snapshot.name, "dataset_sha256": paths.sha256_file(snapshot / "manifest.json")})
    paths.config_file().write_text("[privacy]\nkeep_days = 7\n", encoding="utf-8")
    assert cli.main(["retrain", "--dataset", str(snapshot), "--nice", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "1 turn(s) older than [privacy] keep_days erased"
    assert files_holding("kiwi") == {}
    result = pipeline.main(pipeline.RetrainConfig(dataset=str(snapshot)))
    assert (result["status"], result["expired_turns"]) == ("noop", 0)
