"""Logging chat turns: every question is written before it is answered and completed after, so
an answer cut off by a crash still leaves its question (status ``streaming``) in the log."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone

import sqlite_utils

from feedback import privacy


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class TooManySessions(RuntimeError):
    """One client address opened more new conversations in the last minute than allowed."""


def new_session(db: sqlite_utils.Database, kind: str = "customer", address: str | None = None,
                per_address_per_minute: int | None = None) -> str:
    """Create a chat session and return its unguessable id.

    With ``per_address_per_minute``, refuses (:class:`TooManySessions`) a client ``address`` that
    already opened that many sessions in the last minute; the check and the insert are one transaction.
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
        db["sessions"].insert({"id": session_id, "kind": kind, "created_at": now(), "address": address})
    return session_id


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
                "sources": json.dumps([{"id": s.id, "score": round(s.score, 4)} for s in getattr(stats, "sources", None) or []]),
                "finished_at": now(),
            },
        )


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
