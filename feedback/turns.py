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
    try:
        _store_answer(db, turn_id, answer, stats, status, error)
    except sqlite_utils.db.NotFoundError:
        # Erased (feedback.privacy) while it streamed: the erasure wins, the answer is not stored.
        log.info("turn erased before its answer was stored", extra={"turn_id": turn_id})
        return
    # The event a JSON log ships per answer (assistant.logs): ids and timings, never the text.
    log.info("turn finished", extra={
        "turn_id": turn_id, "adapter": stats.adapter, "status": status, "latency_s": round(stats.latency_s, 4),
        "first_token_s": None if stats.first_token_s is None else round(stats.first_token_s, 4),
        "tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out})


def _store_answer(db: sqlite_utils.Database, turn_id: int, answer: str, stats, status: str, error: str | None) -> None:
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


def session_turn_ids(db: sqlite_utils.Database, session_id: str) -> list[int] | None:
    """Ids of the session's turns, oldest first; None when there is no such session."""
    if db.execute("SELECT 1 FROM sessions WHERE id = ?", [session_id]).fetchone() is None:
        return None
    return [row[0] for row in db.execute("SELECT id FROM turns WHERE session_id = ? ORDER BY id", [session_id])]


def erase_turns(db: sqlite_utils.Database, turn_ids: list[int]) -> None:
    """Delete turns (their votes and corrections must be gone first: :func:`feedback.store.erase_feedback`)
    and take their question/answer pairs out of the ``history`` of the turns that remain: a later
    turn of the same conversation, or of another session of the same API key, holds them there.
    Runs in the caller's transaction (:func:`feedback.privacy.erase`)."""
    if not turn_ids:
        return
    marks = ", ".join("?" * len(turn_ids))
    erased = {(q, a or "") for q, a in db.execute(f"SELECT question, answer FROM turns WHERE id IN ({marks})", turn_ids)}
    # Where copies can be: the erased turns' own sessions and the other sessions of their API keys.
    neighbours = db.execute(
        # A history holds only earlier turns, so only later ones can hold a copy.
        f"""SELECT id, history FROM turns WHERE id > ? AND id NOT IN ({marks}) AND session_id IN (
              SELECT session_id FROM turns WHERE id IN ({marks})
              UNION SELECT id FROM sessions WHERE api_key IN (
                  SELECT s.api_key FROM sessions s JOIN turns t ON t.session_id = s.id WHERE t.id IN ({marks})))""",
        [min(turn_ids), *turn_ids, *turn_ids, *turn_ids],
    ).fetchall()
    for turn_id, history in neighbours:
        pairs = json.loads(history or "[]")
        kept = [pair for pair in pairs if (pair[0], pair[1] or "") not in erased]
        if len(kept) != len(pairs):
            db.execute("UPDATE turns SET history = ? WHERE id = ?", [json.dumps(kept), turn_id])
    db.conn.executemany("DELETE FROM turns WHERE id = ?", [(turn_id,) for turn_id in turn_ids])


def forget_addresses(db: sqlite_utils.Database, session_ids: list[str]) -> None:
    """Clear the client address of sessions; the rows stay, so a chat still open in a browser can
    go on (its next turn needs the session). Runs in the caller's transaction."""
    db.conn.executemany("UPDATE sessions SET address = NULL WHERE id = ?", [(s,) for s in session_ids])
