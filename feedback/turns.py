"""Logging chat turns: every question is written before it is answered and completed after, so
an answer cut off by a crash still leaves its question (status ``streaming``) in the log."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timedelta, timezone

import sqlite_utils

from feedback import privacy

log = logging.getLogger(__name__)

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class TooManySessions(RuntimeError):
    """One client address opened more new conversations in the last minute than allowed."""


def new_session(db: sqlite_utils.Database, kind: str = "customer", address: str | None = None,
                per_address_per_minute: int | None = None, api_key: str | None = None) -> str:
    """Create a chat session and return its unguessable id.

    With ``per_address_per_minute``, refuses (:class:`TooManySessions`) a client ``address`` that
    already opened that many sessions in the last minute; the check and the insert are one transaction.
    ``api_key`` names the API key (:mod:`feedback.apikeys`) of a session opened through the API.
    """
    session_id = secrets.token_urlsafe(16)
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        if address and per_address_per_minute is not None:
            since = (datetime.now(timezone.utc) - timedelta(seconds=60)).isoformat(timespec="microseconds")
            recent = db.execute(
                "SELECT count(*) FROM sessions WHERE address = ? AND created_at > ?", [address, since]
            ).fetchone()[0]
            if recent >= per_address_per_minute:
                raise TooManySessions("Too many new conversations from your network; please try again in a minute.")
        db["sessions"].insert({"id": session_id, "kind": kind, "created_at": now(), "address": address,
                               "api_key": api_key})
    return session_id


def verified_history(db: sqlite_utils.Database, api_key: str, pairs: list[tuple[str, str]], max_turns: int,
                     max_bytes: int) -> list[tuple[str, str]]:
    """The (question, answer) pairs an API client sent back that are this key's own logged turns
    (question as stored, i.e. redacted, and answer exactly as the assistant gave it), latest
    ``max_turns`` and ``max_bytes`` at most: the client's word is never taken for what the
    assistant said. A pair that does not match is dropped, and so is everything before it (a
    conversation is trusted from its latest unbroken run of real turns)."""
    kept, size = [], 0
    for question, answer in reversed(pairs[-max_turns:] if max_turns > 0 else []):
        size += len(question.encode("utf-8", "replace")) + len(answer.encode("utf-8", "replace"))
        if size > max_bytes:
            break
        found = db.execute(
            "SELECT 1 FROM turns t JOIN sessions s ON s.id = t.session_id WHERE s.api_key = ? "
            "AND t.question = ? AND t.answer = ? AND t.status = 'complete' LIMIT 1",
            [api_key, privacy.redact(question), answer],
        ).fetchone()
        if found is None:
            break
        kept.append((privacy.redact(question), answer))
    return kept[::-1]


def api_session_of(db: sqlite_utils.Database, turn_id: int, api_key: str) -> str | None:
    """The session of turn ``turn_id`` if the API key ``api_key`` opened it, else None (so one
    channel cannot rate another's answers)."""
    row = db.execute("SELECT s.id FROM turns t JOIN sessions s ON s.id = t.session_id "
                     "WHERE t.id = ? AND s.api_key = ?", [turn_id, api_key]).fetchone()
    return row[0] if row else None


def conversation(db: sqlite_utils.Database, session_id: str | None, max_turns: int, max_bytes: int) -> list[dict]:
    """The session's latest answered turns, oldest first (``turn_id``, ``question``, ``answer``):
    the server's own record, so nobody can slip in a turn the assistant never said. At most
    ``max_turns`` turns and ``max_bytes`` bytes of text (UTF-8); older turns drop off first."""
    if not session_id or max_turns <= 0:
        return []
    rows = db.execute(
        "SELECT id, question, answer FROM turns WHERE session_id = ? AND status != 'streaming' "
        "AND trim(coalesce(answer, '')) != '' ORDER BY id DESC LIMIT ?",
        [session_id, max_turns],
    ).fetchall()
    kept, size = [], 0
    for turn_id, question, answer in rows:
        size += len(question.encode("utf-8", "replace")) + len(answer.encode("utf-8", "replace"))
        if size > max_bytes:
            break
        kept.append({"turn_id": turn_id, "question": question, "answer": answer})
    return kept[::-1]


def start_turn(db: sqlite_utils.Database, session_id: str, question: str, history: list, base_model: str) -> int:
    """Record a question before answering it, its personal data redacted (:mod:`feedback.privacy`);
    returns the turn id."""
    with db.conn:
        table = db["turns"].insert(
            {
                "session_id": session_id,
                "question": privacy.redact(question),
                "history": json.dumps(history),
                "base_model": base_model,
                "status": "streaming",
                "created_at": now(),
            }
        )
    return int(table.last_pk)


def finish_turn(db: sqlite_utils.Database, turn_id: int, answer: str, stats, status: str = "complete", error: str | None = None) -> None:
    """Store the answer with the adapter that produced it, the references it was given, latency and
    token counts."""
    with db.conn:
        db["turns"].update(
            turn_id,
            {
                "answer": answer,
                "adapter": stats.adapter,
                "status": status,
                "error": error,
                "latency_s": round(stats.latency_s, 4),
                "first_token_s": None if stats.first_token_s is None else round(stats.first_token_s, 4),
                "tokens_in": stats.tokens_in,
                "tokens_out": stats.tokens_out,
                # The knowledge entries the prompt held (feedback.knowledge), so staff see why it answered so.
                # "verbatim": the approved answer given as it is (assistant.chat.answer_from_reference).
                "sources": json.dumps([{"id": s.id, "score": round(s.score, 4)} | ({"verbatim": True} if s.id == getattr(stats, "verbatim", None) else {})
                                       for s in getattr(stats, "sources", None) or []]),
                "finished_at": now(),
            },
        )
    # The event a JSON log ships per answer (assistant.logs): ids and timings, never the text.
    log.info("turn finished", extra={
        "turn_id": turn_id, "adapter": stats.adapter, "status": status, "latency_s": round(stats.latency_s, 4),
        "first_token_s": None if stats.first_token_s is None else round(stats.first_token_s, 4),
        "tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out})


def mark_interrupted(db: sqlite_utils.Database, turn_ids: list[int]) -> int:
    """Mark turns still ``streaming`` as ``interrupted`` (a server stopping before they finished);
    returns how many were."""
    if not turn_ids:
        return 0
    with db.conn:
        cursor = db.execute(
            f"UPDATE turns SET status = 'interrupted', finished_at = ? WHERE status = 'streaming' "
            f"AND id IN ({', '.join('?' * len(turn_ids))})",
            [now(), *turn_ids],
        )
    return cursor.rowcount
