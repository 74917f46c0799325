"""Issue 32, privacy: card numbers, IBANs, SSNs, e-mails and phone numbers a customer types are
redacted before they are stored, shown to staff or put in the model's prompt (real SQLite, the real
Gradio server on 127.0.0.1)."""

from __future__ import annotations

import sqlite3

import pytest

from assistant import config, paths
from feedback import privacy, store, turns
from feedback.db import connect
from test_app import ask, serve_scripted

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
EMAIL = "jo.doe@example.com"
PHONE = "(404) 555-0123"
SSN = "536-22-1234"
SECRETS = (CARD, CARD.replace(" ", ""), "1111 1111 1111", IBAN, IBAN.replace(" ", ""), EMAIL, "555-0123", SSN)


@pytest.mark.parametrize("text, expected", [
    (f"my card is {CARD} thanks", "my card is [CARD] thanks"),
    ("4111-1111-1111-1111", "[CARD]"),
    ("amex 378282246310005, mc 5500 0000 0000 0004", "amex [CARD], mc [CARD]"),
    (f"IBAN {IBAN} please", "IBAN [IBAN] please"),
    ("GB82WEST12345698765432", "[IBAN]"),
    (f"ssn {SSN}", "ssn [SSN]"),
    (f"write to {EMAIL}.", "write to [EMAIL]."),
    (f"call {PHONE} or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
])
def test_personal_data_becomes_typed_placeholders(text, expected):
    assert privacy.redact(text) == expected


@pytest.mark.parametrize("text", [
    "order 4111 1111 1111 1112",  # fails the Luhn check
    "0000 0000 0000 0000",  # passes Luhn, no issuer
    "account 12345678, sort code 20-00-00",
    "I paid $1,250.00 on 2026-11-30 at 14:05",
    "the 30-year fixed rate is 6.125% APR",
    "DE00 1234 5678 9012 3456 78",  # bad IBAN check digits
])
def test_numbers_that_are_not_personal_data_stay(text):
    assert privacy.redact(text) == text


def test_the_kinds_are_configurable_and_checked(tuneloop_home, monkeypatch):
    paths.config_file().write_text('[privacy]\nredact = ["email"]\n', encoding="utf-8")
    assert privacy.redact(f"{CARD} {EMAIL}") == f"{CARD} [EMAIL]"
    monkeypatch.setenv("TUNELOOP_PRIVACY_REDACT", "card,iban")
    assert privacy.redact(f"{CARD} {EMAIL}") == f"[CARD] {EMAIL}"
    monkeypatch.setenv("TUNELOOP_PRIVACY_REDACT", "")
    assert privacy.redact(f"{CARD} {EMAIL}") == f"{CARD} {EMAIL}"
    with pytest.raises(config.ConfigError, match="unknown kind"):
        privacy.PrivacyConfig(redact=["cards"])


def test_the_storage_boundary_redacts_questions_and_vote_reasons(tuneloop_home):
    db = connect()
    session = turns.new_session(db, "customer")
    turn_id = turns.start_turn(db, session, f"my card {CARD} and {EMAIL}", [], "base")
    db["turns"].update(turn_id, {"answer": "ok", "status": "complete"})
    store.log_vote(db, session, turn_id, "down", f"you ignored my IBAN {IBAN}")
    assert db["turns"].get(turn_id)["question"] == "my card [CARD] and [EMAIL]"
    assert store.review_item(db, turn_id)["reason"] == "you ignored my IBAN [IBAN]"


def test_nothing_typed_into_the_chat_is_kept_anywhere(tuneloop_home):
    question = f"card {CARD}, IBAN {IBAN}, mail {EMAIL}, phone {PHONE}, ssn {SSN}"
    with serve_scripted() as served:
        customer = served.client()
        turn_id = ask(customer, question)
        history, _box, _turn = customer.predict(f"again: {CARD}", api_name="/chat")
        customer.predict(turn_id, "down", f"wrong, my card is {CARD}", api_name="/vote")
        # The model never saw them: the prompt held the placeholders.
        prompts = repr(served.backend.calls)
        assert "[CARD]" in prompts and "[IBAN]" in prompts and "[EMAIL]" in prompts
        # The customer sees what was stored, not the number.
        assert "[CARD]" in repr(history)
        staff = served.staff_client()
        queue = repr(staff.predict(api_name="/review_queue"))
        item = repr(staff.predict(turn_id, api_name="/review_item"))
        for secret in SECRETS:
            assert secret not in prompts and secret not in repr(history), secret
            assert secret not in queue and secret not in item, secret
    stored = served.rows("SELECT question, coalesce(answer, ''), history FROM turns")
    assert stored[0][0] == "card [CARD], IBAN [IBAN], mail [EMAIL], phone [PHONE], ssn [SSN]"
    assert_no_file_holds(SECRETS)


def test_nothing_sent_to_the_api_is_kept_anywhere_nor_shown_to_staff(tuneloop_home):
    # The chat is covered above; the OpenAI-compatible API (feedback.api) is the other way in.
    import httpx

    from feedback import api, apikeys

    key = apikeys.create_key(connect(), "web")
    question = f"card {CARD}, IBAN {IBAN}, mail {EMAIL}"
    with serve_scripted() as served:
        response = httpx.post(served.url + api.COMPLETIONS_PATH, headers={"Authorization": f"Bearer {key}"},
                              json={"model": "any", "messages": [{"role": "user", "content": question}]}, timeout=30)
        assert response.status_code == 200, response.text
        turn_id = int(response.json()["id"].removeprefix("chatcmpl-"))
        voted = httpx.post(served.url + api.FEEDBACK_PATH, headers={"Authorization": f"Bearer {key}"},
                           json={"id": response.json()["id"], "value": "down", "reason": f"my mail is {EMAIL}"}, timeout=30)
        assert voted.status_code == 200, voted.text
        staff = served.staff_client()
        queue = repr(staff.predict(api_name="/review_queue"))
        item = repr(staff.predict(turn_id, api_name="/review_item"))
        assert "[CARD], IBAN [IBAN], mail [EMAIL]" in queue and "my mail is [EMAIL]" in item
        for secret in SECRETS:
            assert secret not in response.text and secret not in queue and secret not in item, secret
    assert served.rows("SELECT question FROM turns") == [("card [CARD], IBAN [IBAN], mail [EMAIL]",)]
    assert_no_file_holds(SECRETS)


def assert_no_file_holds(secrets) -> None:
    """Nothing under the home holds them: the database, its WAL (checkpointed first), Gradio's files, logs."""
    with sqlite3.connect(paths.feedback_db()) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for file in paths.home().rglob("*"):
        if file.is_file():
            raw = file.read_bytes()
            for secret in secrets:
                assert secret.encode() not in raw, (file, secret)
