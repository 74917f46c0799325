"""``tuneloop staff remove|disable|enable|unlock|passwd`` on a real SQLite file: each command's
effect on sign-in and sessions, its message and its exit code."""

from __future__ import annotations

import io

import pytest

from feedback import auth, store
from feedback.db import connect
from tuneloop import cli

LIMITS = auth.SigninLimits(hashes_per_minute=100, hashes_per_address_per_minute=100)


@pytest.fixture
def db(tuneloop_home):
    database = connect()
    auth.add_staff(database, "alice", "correct horse battery")
    yield database
    database.close()


def run(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(["staff", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_disable_then_enable_restores_the_old_password_but_not_the_sessions(db, capsys):
    token = auth.create_session(db, "alice")
    assert run(capsys, "disable", "alice") == (0, "staff user alice disabled; 1 session(s) ended\n", "")
    with pytest.raises(auth.AuthError, match="Wrong staff name or password"):
        auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", LIMITS)
    assert run(capsys, "enable", "alice") == (0, "staff user alice enabled\n", "")
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", LIMITS) == "alice"
    assert auth.session_staff(db, token) is None  # disabling ended it for good
    assert run(capsys, "enable", "nobody") == (2, "", "tuneloop staff enable: There is no staff user 'nobody'.\n")


def test_remove_deletes_the_user_and_their_sessions(db, capsys):
    token = auth.create_session(db, "alice")
    assert run(capsys, "remove", "alice") == (0, "staff user alice removed; 1 session(s) ended\n", "")
    assert auth.list_staff(db) == [] and auth.session_staff(db, token) is None
    assert db["staff_sessions"].count == 0
    assert run(capsys, "remove", "alice") == (2, "", "tuneloop staff remove: There is no staff user 'alice'.\n")


def test_remove_is_refused_for_a_member_whose_corrections_keep_their_name(db, capsys):
    store.add_example(db, "alice", "Hand question?", "Hand answer.", None)
    code, out, err = run(capsys, "remove", "alice")
    assert (code, out) == (2, "")
    assert err == ("tuneloop staff remove: alice wrote 1 correction(s), approval(s) or example(s), which keep "
                   "their name; use `tuneloop staff disable alice` instead.\n")
    assert [u["name"] for u in auth.list_staff(db)] == ["alice"]


def test_unlock_clears_the_backoff_of_that_name_from_every_address_only(db, capsys):
    auth.add_staff(db, "bob", "another long password")
    for name in ("alice", "bob"):
        for address in ("10.0.0.8", "10.0.0.9"):
            for _ in range(LIMITS.backoff_after_failures):
                with pytest.raises(auth.AuthError, match="Wrong staff name or password"):
                    auth.sign_in(db, name, "guess", address, LIMITS)
    with pytest.raises(auth.AuthError, match="try again in"):
        auth.sign_in(db, "alice", "correct horse battery", "10.0.0.9", LIMITS)
    failures = 2 * LIMITS.backoff_after_failures
    assert run(capsys, "unlock", "alice") == (0, f"staff user alice unlocked; {failures} failed sign-in(s) forgiven\n", "")
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.9", LIMITS) == "alice"
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.8", LIMITS) == "alice"
    with pytest.raises(auth.AuthError, match="try again in"):
        auth.sign_in(db, "bob", "another long password", "10.0.0.9", LIMITS)
    # The record stays: forgiven failures still count against the per-minute hash budgets.
    assert db.execute("SELECT count(*) FROM signin_attempts WHERE name = 'alice'").fetchone()[0] == failures + 2
    assert run(capsys, "unlock", "nobody") == (2, "", "tuneloop staff unlock: There is no staff user 'nobody'.\n")


def test_passwd_changes_the_password_and_ends_every_session(db, capsys, monkeypatch):
    tokens = [auth.create_session(db, "alice") for _ in range(2)]
    code, out, err = run(capsys, "passwd", "alice", "--password-stdin", stdin="a brand new password\n", monkeypatch=monkeypatch)
    assert (code, out, err) == (0, "password of alice changed; 2 session(s) ended\n", "")
    assert all(auth.session_staff(db, token) is None for token in tokens)
    assert auth.sign_in(db, "alice", "a brand new password", "10.0.0.1", LIMITS) == "alice"
    with pytest.raises(auth.AuthError, match="Wrong staff name or password"):
        auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", LIMITS)


def test_passwd_refuses_unknown_names_short_passwords_and_differing_prompts(db, capsys, monkeypatch):
    assert run(capsys, "passwd", "nobody", "--password-stdin", stdin="long enough pw\n", monkeypatch=monkeypatch) == (
        2, "", "tuneloop staff passwd: There is no staff user 'nobody'.\n")
    assert auth.list_staff(db)[0]["name"] == "alice" and len(auth.list_staff(db)) == 1  # never creates a user
    assert run(capsys, "passwd", "alice", "--password-stdin", stdin="short\n", monkeypatch=monkeypatch) == (
        2, "", "tuneloop staff passwd: A password is 8 to 1024 characters long.\n")
    typed = iter(["first password", "second password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    assert run(capsys, "passwd", "alice") == (2, "", "tuneloop staff passwd: the passwords differ; nothing changed\n")
    assert auth.sign_in(db, "alice", "correct horse battery", "10.0.0.1", LIMITS) == "alice"


def test_passwd_leaves_a_disabled_member_disabled(db, capsys, monkeypatch):
    auth.disable_staff(db, "alice")
    assert run(capsys, "passwd", "alice", "--password-stdin", stdin="a brand new password\n", monkeypatch=monkeypatch)[0] == 0
    assert not auth.is_staff(db, "alice")
