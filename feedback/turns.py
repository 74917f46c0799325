"""Logging chat turns: every question is written before it is answered and completed after, so
an answer cut off by a crash still leaves its question (status ``streaming``) in the log."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone

import sqlite_utils


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_session(db: sqlite_utils.Database, kind: str = "customer") -> str:
    """Create a chat session and return its unguessable id."""
    session_id = secrets.token_urlsafe(16)
    db["sessions"].insert({"id": session_id, "kind": kind, "created_at": now()})
    return session_id


def start_turn(db: sqlite_utils.Database, session_id: str, question: str, history: list, base_model: str) -> int:
    """Record a question before answering it; returns the turn id."""
    with db.conn:
        table = db["turns"].insert(
            {
                "session_id": session_id,
                "question": question,
                "history": json.dumps(history),
                "base_model": base_model,
                "status": "streaming",
                "created_at": now(),
            }
        )
    return int(table.last_pk)


def finish_turn(db: sqlite_utils.Database, turn_id: int, answer: str, stats, status: str = "complete", error: str | None = None) -> None:
    """Store the answer with the adapter that produced it, latency and token counts."""
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
                "finished_at": now(),
            },
        )
