"""Feedback on logged turns: customer votes, staff corrections and approvals, hand-written
examples, the review queue, counts, and the export of training examples.

Votes are never updated or deleted: each vote is a new row and the latest unflagged one for a turn
counts. A vote past one of the limits of :class:`VoteLimits` (per session, per client address
across all its sessions, and for the whole server, each per minute) is still stored (as evidence),
but marked ``flagged`` and left out of every count, queue and export. A thumbs-up alone is never
training data unless the curation config asks for it: staff approve good answers from the queue.

Corrections rows have three kinds: ``correction`` (staff rewrote the answer of a turn),
``approval`` (staff marked the turn's answer as good; its answer is copied) and ``manual`` (a
hand-written question and answer, ``turn_id`` NULL). Every write runs in one transaction.

Every staff decision on a queued answer is also a ``review_actions`` row (who, when): a correction,
an approval or a rejection (out of the queue, never trained on). :func:`undo` reverts a staff
member's latest decision on an answer: a correction or approval row (and its knowledge entry) goes,
and the action is kept, marked undone by whom and when. The queue is filtered by :class:`QueueFilter`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone

from dataclasses import dataclass

import sqlite_utils

from feedback.text import NOT_STORABLE, is_storable

from feedback import auth, knowledge, privacy

VOTE_BURST_LIMIT = 10
VOTE_BURST_WINDOW_S = 60
REVIEW_PAGE_SIZE = 50
MAX_REASON_CHARS = 500
MAX_ANSWER_CHARS = 4000
MAX_QUESTION_CHARS = 2000
MAX_LABEL_CHARS = 64
KINDS = ("correction", "approval", "manual")
UP, DOWN = 1, -1
# Session kinds whose turns are not customers' (``tuneloop ask``, tests): hidden from the queue by default.
HIDDEN_KINDS = ("cli", "test")
ACTIONS = ("correction", "approval", "rejection")

# The latest unflagged vote of every voted turn: the one that counts.
_LATEST_VOTES = """
latest_votes AS (
    SELECT v.turn_id, v.value, v.reason, v.created_at
    FROM votes v
    JOIN (SELECT turn_id, max(id) AS id FROM votes WHERE flagged = 0 GROUP BY turn_id) last ON last.id = v.id
),
reviewed AS (
    SELECT DISTINCT turn_id FROM corrections WHERE kind IN ('correction', 'approval') AND turn_id IS NOT NULL
    UNION
    SELECT turn_id FROM review_actions WHERE action = 'rejection' AND undone_at IS NULL
)
"""


class FeedbackError(ValueError):
    """A vote, correction or example is refused; the message is shown to the person who sent it."""


@dataclass(frozen=True)
class VoteLimits:
    """Votes counted per :data:`VOTE_BURST_WINDOW_S` seconds; past any of them a vote is flagged."""

    per_session: int = VOTE_BURST_LIMIT
    per_address: int = 30
    overall: int = 600


@dataclass(frozen=True)
class QueueFilter:
    """Which answers the review queue lists; the defaults are the answers still waiting for staff."""

    thumbs_down: bool = False
    """Only answers whose counting vote is thumbs-down."""
    has_correction: bool = False
    """Only answers staff have written a correction for."""
    not_reviewed: bool = True
    """Only answers without a correction, approval or rejection."""
    adapter: str | None = None
    """Only answers of this adapter version ("base" for the base model)."""
    label: str | None = None
    """Only answers a correction or approval labelled so."""
    since: str | None = None
    """First day (YYYY-MM-DD, UTC) of the answers listed."""
    until: str | None = None
    """Last day (YYYY-MM-DD, UTC) of the answers listed."""
    show_hidden: bool = False
    """Also list turns of CLI and test sessions (:data:`HIDDEN_KINDS`)."""

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value:
                try:
                    date.fromisoformat(value)
                except ValueError:
                    raise FeedbackError(f"{value!r} is not a date; write it as YYYY-MM-DD.") from None
        if self.since and self.until and self.since > self.until:
            raise FeedbackError(f"The date range ends ({self.until}) before it starts ({self.since}).")

    def where(self) -> tuple[str, list]:
        """The SQL condition on ``t`` (turns), ``s`` (sessions) and ``lv`` (latest votes), and its parameters."""
        clauses, params = ["t.answer IS NOT NULL", "t.status != 'streaming'"], []
        if not self.show_hidden:
            clauses.append(f"s.kind NOT IN ({', '.join('?' * len(HIDDEN_KINDS))})")
            params += HIDDEN_KINDS
        if self.thumbs_down:
            clauses.append("lv.value = -1")
        if self.has_correction:
            clauses.append("t.id IN (SELECT turn_id FROM corrections WHERE kind = 'correction')")
        if self.not_reviewed:
            clauses.append("t.id NOT IN (SELECT turn_id FROM reviewed)")
        if self.adapter:
            clauses.append("t.adapter IS NULL" if self.adapter == "base" else "t.adapter = ?")
            params += [] if self.adapter == "base" else [self.adapter]
        if self.label:
            clauses.append("t.id IN (SELECT turn_id FROM corrections WHERE label = ?)")
            params.append(self.label)
        if self.since:
            clauses.append("t.created_at >= ?")
            params.append(self.since)
        if self.until:
            clauses.append("t.created_at < ?")
            params.append((date.fromisoformat(self.until) + timedelta(days=1)).isoformat())
        return " AND ".join(clauses), params


@contextmanager
def _transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """Checks and writes in one transaction: all of it is stored or none of it."""
    with db.conn:
        # IMMEDIATE takes the write lock before the checks, so two concurrent writers cannot both
        # pass a check (e.g. the vote rate limit) that only one of them should.
        db.execute("BEGIN IMMEDIATE")
        yield


def log_vote(db: sqlite_utils.Database, session_id: str, turn_id: int, value: int | str, reason: str | None = None,
             limits: VoteLimits = VoteLimits()) -> dict:
    """Record a customer's thumbs up (``1``/``"up"``) or down (``-1``/``"down"``) on one of their turns.

    Returns ``{"id", "turn_id", "value", "flagged"}``. Refuses turns that do not exist, belong to
    another session or have no answer yet, and reasons longer than :data:`MAX_REASON_CHARS`.
    """
    value = _vote_value(value)
    # A customer's words: personal data redacted before anything else looks at them.
    reason = privacy.redact((reason or "").strip()) or None
    if reason is not None and not is_storable(reason):
        raise FeedbackError(f"The reason {NOT_STORABLE}.")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise FeedbackError(f"The reason is {len(reason)} characters long; the limit is {MAX_REASON_CHARS}.")
    if reason is not None and value == UP:
        reason = None  # a reason is asked for on thumbs-down only
    turn_id = _turn_id(turn_id)
    with _transaction(db):
        turn = db.execute("SELECT session_id, answer FROM turns WHERE id = ?", [turn_id]).fetchone()
        # The same message for "no such turn" and "someone else's turn": nothing leaks about other sessions.
        if turn is None or not session_id or turn[0] != session_id:
            raise FeedbackError(f"There is no answer {turn_id} in this conversation to rate.")
        if not turn[1]:
            raise FeedbackError("This answer is not finished yet; rate it once it is complete.")
        since = _iso(_utcnow() - timedelta(seconds=VOTE_BURST_WINDOW_S))
        # Votes go only to the session's own turns, so counting through turns(session_id) is exact
        # and uses the existing indexes.
        recent = db.execute(
            "SELECT count(*) FROM votes WHERE session_id = ? AND created_at > ? "
            "AND turn_id IN (SELECT id FROM turns WHERE session_id = ?)",
            [session_id, since, session_id],
        ).fetchone()[0]
        # A new session is free to open, so the session limit alone is no limit: the client
        # address's sessions together, and the whole server, have their own.
        (address,) = db.execute("SELECT address FROM sessions WHERE id = ?", [session_id]).fetchone()
        from_address = db.execute(
            "SELECT count(*) FROM votes v JOIN sessions s ON s.id = v.session_id "
            "WHERE v.created_at > ? AND s.address = ?",
            [since, address],
        ).fetchone()[0] if address else 0
        overall = db.execute("SELECT count(*) FROM votes WHERE created_at > ?", [since]).fetchone()[0]
        flagged = int(recent >= limits.per_session or from_address >= limits.per_address or overall >= limits.overall)
        vote_id = db["votes"].insert(
            {"turn_id": turn_id, "session_id": session_id, "value": value, "reason": reason,
             "flagged": flagged, "created_at": _iso(_utcnow())}
        ).last_pk
    return {"id": int(vote_id), "turn_id": turn_id, "value": value, "flagged": bool(flagged)}


def record_correction(db: sqlite_utils.Database, staff_user: str, turn_id: int, answer: str, label: str | None = None) -> int:
    """Store a staff member's corrected answer for a turn; returns the corrections row id."""
    answer = _text(answer, "corrected answer", MAX_ANSWER_CHARS)
    label = _label(label)
    turn_id = _turn_id(turn_id)
    vector = _question_vector(db, staff_user, lambda: _turn(db, turn_id)["question"])
    with _transaction(db):
        _require_staff(db, staff_user)
        label = _known_spelling(db, label)
        turn = _turn(db, turn_id)
        if _words(answer) == _words(turn["answer"]):
            raise FeedbackError("The correction is the same as the answer; change it, or approve the answer instead.")
        row_id = _insert_correction(db, "correction", turn_id, turn["question"], answer, label, staff_user, vector)
        _record_action(db, turn_id, "correction", row_id, staff_user)
        return row_id


def approve(db: sqlite_utils.Database, staff_user: str, turn_id: int, label: str | None = None) -> int:
    """Mark a turn's answer as good (it becomes a training example as is); returns the row id."""
    label = _label(label)
    turn_id = _turn_id(turn_id)
    vector = _question_vector(db, staff_user, lambda: _turn(db, turn_id)["question"])
    with _transaction(db):
        _require_staff(db, staff_user)
        turn = _turn(db, turn_id)
        if turn["status"] != "complete" or not (turn["answer"] or "").strip():
            raise FeedbackError(f"Answer {turn_id} is incomplete ({turn['status']}); write a correction instead.")
        label = _known_spelling(db, label)
        row_id = _insert_correction(db, "approval", turn_id, turn["question"], turn["answer"], label, staff_user, vector)
        _record_action(db, turn_id, "approval", row_id, staff_user)
        return row_id


def reject(db: sqlite_utils.Database, staff_user: str, turn_id: int) -> int:
    """Take a turn out of the queue without training on it (nor answering from it); returns the action id."""
    turn_id = _turn_id(turn_id)
    with _transaction(db):
        _require_staff(db, staff_user)
        _turn(db, turn_id)
        return _record_action(db, turn_id, "rejection", None, staff_user)


def undo(db: sqlite_utils.Database, staff_user: str, turn_id: int) -> dict:
    """Revert ``staff_user``'s latest decision on a turn that is not undone yet: a correction or
    approval row goes (with its knowledge entry), a rejection puts the turn back in the queue. The
    action stays, marked undone by whom and when. Returns ``{"id", "action"}`` of the undone action."""
    turn_id = _turn_id(turn_id)
    with _transaction(db):
        _require_staff(db, staff_user)
        last = db.execute(
            "SELECT id, action, correction_id FROM review_actions WHERE turn_id = ? AND staff_user = ? "
            "AND undone_at IS NULL ORDER BY id DESC LIMIT 1", [turn_id, staff_user]).fetchone()
        if last is None:
            raise FeedbackError(f"You have nothing to undo on answer {turn_id}.")
        action_id, action, correction_id = last
        if correction_id is not None:
            knowledge.erase_entries(db, [f"corrections:{correction_id}"])
            db.execute("DELETE FROM corrections WHERE id = ?", [correction_id])
        db.execute("UPDATE review_actions SET undone_by = ?, undone_at = ? WHERE id = ?",
                   [staff_user, _iso(_utcnow()), action_id])
    return {"id": int(action_id), "action": action}


def review_actions(db: sqlite_utils.Database, turn_id: int) -> list[dict]:
    """The staff decisions on a turn, oldest first: ``{"id", "action", "correction_id", "staff_user",
    "created_at", "undone_by", "undone_at"}``."""
    return list(db.query(
        "SELECT id, action, correction_id, staff_user, created_at, undone_by, undone_at FROM review_actions "
        "WHERE turn_id = ? ORDER BY id", [_turn_id(turn_id)]))


def labels(db: sqlite_utils.Database) -> list[str]:
    """The label taxonomy: distinct labels of the imported examples and of staff corrections, sorted."""
    rows = db.execute(
        "SELECT label FROM examples WHERE label IS NOT NULL AND trim(label) != '' "
        "UNION SELECT label FROM corrections WHERE label IS NOT NULL AND trim(label) != ''").fetchall()
    return sorted({row[0] for row in rows}, key=str.lower)


def label_key(label: str) -> str:
    """A label's comparison form: case, spaces, ``-`` and ``_`` do not make a different label."""
    return re.sub(r"[\s_\-]+", "-", label.strip().lower()).strip("-")


def check_new_label(db: sqlite_utils.Database, label: str | None) -> str:
    """A new label as it will be stored; refused when it is empty or only another spelling of an existing one."""
    label = _label(label)
    if label is None:
        raise FeedbackError("Write the new label first.")
    existing = {label_key(known): known for known in labels(db)}
    if label_key(label) in existing and existing[label_key(label)] != label:
        raise FeedbackError(f"{label!r} is the existing label {existing[label_key(label)]!r}; pick that one from the list.")
    return label


def add_example(db: sqlite_utils.Database, staff_user: str, question: str, answer: str, label: str | None = None) -> int:
    """Store a hand-written question and answer (kind ``manual``, no turn); returns the row id."""
    question = _text(question, "question", MAX_QUESTION_CHARS)
    answer = _text(answer, "answer", MAX_ANSWER_CHARS)
    label = _label(label)
    vector = _question_vector(db, staff_user, lambda: question)
    with _transaction(db):
        _require_staff(db, staff_user)
        label = _known_spelling(db, label)
        return _insert_correction(db, "manual", None, question, answer, label, staff_user, vector)


def _question_vector(db, staff_user, question):
    """The knowledge index's vector of the question, computed before the write lock is taken (the
    first embedding in a process loads the model); staff are checked first, so a refused caller
    costs no model time."""
    _require_staff(db, staff_user)
    return knowledge.question_vector(db, question())


def _insert_correction(db, kind, turn_id, question, answer, label, staff_user, vector) -> int:
    row = {"turn_id": turn_id, "kind": kind, "question": question, "answer": answer, "label": label,
           "staff_user": staff_user, "created_at": _iso(_utcnow())}
    row_id = int(db["corrections"].insert(row).last_pk)
    # In the same transaction: the next question can be answered from it, and it is never indexed
    # without being saved (feedback.knowledge).
    knowledge.add_staff_entry(db, kind, row_id, turn_id, question, answer, label, vector)
    return row_id


def _record_action(db, turn_id: int, action: str, correction_id: int | None, staff_user: str) -> int:
    return int(db["review_actions"].insert({"turn_id": turn_id, "action": action, "correction_id": correction_id,
                                            "staff_user": staff_user, "created_at": _iso(_utcnow())}).last_pk)


def _queue_sql(filters: QueueFilter) -> tuple[str, list]:
    where, params = filters.where()
    return f"""
    WITH {_LATEST_VOTES}
    SELECT t.id AS turn_id, lv.value AS vote_value, lv.reason, t.question, t.answer, t.adapter, t.created_at,
           s.kind AS session_kind
    FROM turns t
    JOIN sessions s ON s.id = t.session_id
    LEFT JOIN latest_votes lv ON lv.turn_id = t.id
    WHERE {where}
    """, params


def review_queue(db: sqlite_utils.Database, page: int = 1, page_size: int = REVIEW_PAGE_SIZE,
                 filters: QueueFilter = QueueFilter()) -> list[dict]:
    """One page (1 = first) of the turns waiting for staff: thumbs-down first, then thumbs-up
    (a thumbs-up trains only once staff approve it), then unrated answers, each newest first.

    By default (:class:`QueueFilter`) a turn leaves the queue once it has a correction, approval or
    rejection. Each item holds ``turn_id``, ``vote`` ("down", "up" or None), ``reason``, ``question``,
    ``answer``, ``adapter``, ``created_at``, ``session_kind``.
    """
    page = max(1, int(page or 1))
    sql, params = _queue_sql(filters)
    rows = db.query(
        f"""{sql}
        ORDER BY CASE lv.value WHEN -1 THEN 0 WHEN 1 THEN 1 ELSE 2 END, t.id DESC
        LIMIT ? OFFSET ?
        """,
        params + [page_size, (page - 1) * page_size],
    )
    return [
        {"turn_id": r["turn_id"], "vote": {DOWN: "down", UP: "up"}.get(r["vote_value"]), "reason": r["reason"],
         "question": r["question"], "answer": r["answer"], "adapter": r["adapter"], "created_at": r["created_at"],
         "session_kind": r["session_kind"]}
        for r in rows
    ]


def review_queue_size(db: sqlite_utils.Database, filters: QueueFilter = QueueFilter()) -> int:
    """How many turns the filtered queue holds in all (every page of :func:`review_queue`)."""
    sql, params = _queue_sql(filters)
    return int(db.execute(f"SELECT count(*) FROM ({sql})", params).fetchone()[0])


def queue_neighbour(db: sqlite_utils.Database, turn_id: int | None, filters: QueueFilter = QueueFilter(),
                    step: int = 1) -> int | None:
    """The turn ``step`` places after (negative: before) ``turn_id`` in the filtered queue's order;
    from a turn not in it (none yet, or just reviewed) the first one. None past either end."""
    sql, params = _queue_sql(filters)
    row = db.execute(
        f"""WITH ordered AS (
            SELECT turn_id, row_number() OVER (
                ORDER BY CASE vote_value WHEN -1 THEN 0 WHEN 1 THEN 1 ELSE 2 END, turn_id DESC) AS pos
            FROM ({sql}))
        SELECT turn_id FROM ordered
        WHERE pos = coalesce((SELECT pos FROM ordered WHERE turn_id = ?), CASE WHEN ? > 0 THEN 0 ELSE 1 END) + ?""",
        params + [turn_id, step, step]).fetchone()
    return int(row[0]) if row else None


def review_counts(db: sqlite_utils.Database, show_hidden: bool = False) -> dict:
    """How many answers each single filter would list: ``all``, ``thumbs_down``, ``has_correction``,
    ``not_reviewed``, ``rejected`` (CLI and test turns counted only with ``show_hidden``)."""
    sql, params = _queue_sql(QueueFilter(not_reviewed=False, show_hidden=show_hidden))
    row = db.execute(
        f"""WITH {_LATEST_VOTES}
        SELECT count(*),
               coalesce(sum(q.vote_value = -1), 0),
               coalesce(sum(q.turn_id IN (SELECT turn_id FROM corrections WHERE kind = 'correction')), 0),
               coalesce(sum(q.turn_id NOT IN (SELECT turn_id FROM reviewed)), 0),
               coalesce(sum(q.turn_id IN (SELECT turn_id FROM review_actions
                                          WHERE action = 'rejection' AND undone_at IS NULL)), 0)
        FROM ({sql}) q""", params).fetchone()
    return dict(zip(("all", "thumbs_down", "has_correction", "not_reviewed", "rejected"), (int(v) for v in row)))


def review_item(db: sqlite_utils.Database, turn_id: int) -> dict:
    """One turn for review: the earlier conversation, question, answer, adapter, vote, corrections
    and the references the answer was given (``{"id", "score", "question", "answer", "removed"}``,
    best first; a removed entry is still shown, marked, since the answer was made from it)."""
    turn_id = _turn_id(turn_id)
    turn = _turn(db, turn_id)
    vote = db.execute(
        "SELECT value, reason FROM votes WHERE turn_id = ? AND flagged = 0 ORDER BY id DESC LIMIT 1", [turn_id]
    ).fetchone()
    corrections = list(db.query(
        "SELECT id, kind, answer, label, staff_user, created_at FROM corrections WHERE turn_id = ? ORDER BY id",
        [turn_id],
    ))
    return {
        "turn_id": turn_id,
        "history": [list(pair) for pair in json.loads(turn["history"] or "[]")],
        "question": turn["question"],
        "answer": turn["answer"],
        "adapter": turn["adapter"],
        "base_model": turn["base_model"],
        "status": turn["status"],
        "vote": {UP: "up", DOWN: "down"}.get(vote[0]) if vote else None,
        "reason": vote[1] if vote else None,
        "corrections": corrections,
        "references": _references_of(db, turn),
        "created_at": turn["created_at"],
    }


def _references_of(db: sqlite_utils.Database, turn: dict) -> list[dict]:
    references = []
    for source in json.loads(turn.get("sources") or "[]"):
        found = knowledge.entries(db, int(source["id"]), include_removed=True)
        entry = found[0] if found else {"question": None, "answer": None, "removed_at": None}
        references.append({"id": int(source["id"]), "score": source.get("score"), "question": entry["question"],
                           "answer": entry["answer"], "removed": entry["removed_at"] is not None or not found,
                           "verbatim": bool(source.get("verbatim"))})
    return references


def stats(db: sqlite_utils.Database) -> dict:
    """Counts: ``turns``, ``up`` and ``down`` (turns whose counting vote is up/down), ``corrections``
    (rows of every kind), ``pending_review`` (thumbs-down turns not yet corrected or approved) and
    ``flagged_votes``."""
    row = db.execute(
        f"""
        WITH {_LATEST_VOTES}
        SELECT
            (SELECT count(*) FROM turns),
            (SELECT count(*) FROM latest_votes WHERE value = 1),
            (SELECT count(*) FROM latest_votes WHERE value = -1),
            (SELECT count(*) FROM corrections),
            (SELECT count(*) FROM latest_votes WHERE value = -1 AND turn_id NOT IN (SELECT turn_id FROM reviewed)),
            (SELECT count(*) FROM votes WHERE flagged = 1)
        """
    ).fetchone()
    keys = ("turns", "up", "down", "corrections", "pending_review", "flagged_votes")
    return dict(zip(keys, (int(v) for v in row)))


def export_rows(db: sqlite_utils.Database, include_thumbs_up: bool = False) -> list[dict]:
    """The examples training may use, oldest first: ``{"source", "id", "turn_id", "question", "answer", "label"}``.

    Per turn the latest staff correction or approval wins; with ``include_thumbs_up`` also a
    complete answer whose counting vote is thumbs-up, unless a CLI or test session asked it (a probe's
    vote is not a customer's). Every manual example. Thumbs-down answers never.
    """
    rows = db.query(
        f"""
        WITH {_LATEST_VOTES},
        gold AS (
            SELECT c.* FROM corrections c
            JOIN (SELECT turn_id, max(id) AS id FROM corrections
                  WHERE kind IN ('correction', 'approval') AND turn_id IS NOT NULL GROUP BY turn_id) last
              ON last.id = c.id
        )
        SELECT kind AS source, id, turn_id, question, answer, label, created_at FROM gold
        UNION ALL
        SELECT 'manual', id, NULL, question, answer, label, created_at FROM corrections WHERE kind = 'manual'
        UNION ALL
        SELECT 'thumbs_up', t.id, t.id, t.question, t.answer, NULL, t.created_at
        FROM turns t JOIN latest_votes lv ON lv.turn_id = t.id
        WHERE lv.value = 1 AND t.status = 'complete' AND trim(coalesce(t.answer, '')) != ''
          AND t.id NOT IN (SELECT turn_id FROM reviewed) AND ?
          AND t.session_id NOT IN (SELECT id FROM sessions WHERE kind IN ({', '.join('?' * len(HIDDEN_KINDS))}))
        ORDER BY created_at, id
        """,
        [int(include_thumbs_up), *HIDDEN_KINDS],
    )
    return [{k: r[k] for k in ("source", "id", "turn_id", "question", "answer", "label")} for r in rows]


def chat_example(system_prompt: str, question: str, answer: str) -> dict:
    """One training example in chat-messages form: system persona, question, answer."""
    return {
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": answer.strip()},
        ]
    }


def export_jsonl(db: sqlite_utils.Database, system_prompt: str, include_thumbs_up: bool = False) -> Iterator[str]:
    """The exported examples as JSONL lines (no trailing newline), one chat example each."""
    for row in export_rows(db, include_thumbs_up):
        yield json.dumps(chat_example(system_prompt, row["question"], row["answer"]), ensure_ascii=False)


def corrections_of(db: sqlite_utils.Database, turn_ids: list[int]) -> list[dict]:
    """``{"id", "question"}`` of every correction and approval of these turns."""
    marks = ", ".join("?" * len(turn_ids))
    return [{"id": r[0], "question": r[1]} for r in db.execute(
        f"SELECT id, question FROM corrections WHERE turn_id IN ({marks}) ORDER BY id", turn_ids)] if turn_ids else []


def erase_feedback(db: sqlite_utils.Database, turn_ids: list[int]) -> None:
    """Delete the votes (with their reasons) and the corrections and approvals of these turns, before
    the turns themselves go (:func:`feedback.privacy.erase`); runs in the caller's transaction."""
    db.conn.executemany("DELETE FROM votes WHERE turn_id = ?", [(turn_id,) for turn_id in turn_ids])
    db.conn.executemany("DELETE FROM corrections WHERE turn_id = ?", [(turn_id,) for turn_id in turn_ids])
    db.conn.executemany("DELETE FROM review_actions WHERE turn_id = ?", [(turn_id,) for turn_id in turn_ids])


def _require_staff(db: sqlite_utils.Database, staff_user: str | None) -> None:
    if not auth.is_staff(db, staff_user):
        raise auth.AuthError("Staff only: this needs a signed-in, enabled staff user.")


def _turn(db: sqlite_utils.Database, turn_id: int) -> dict:
    rows = list(db.query("SELECT * FROM turns WHERE id = ?", [turn_id]))
    if not rows:
        raise FeedbackError(f"There is no answer {turn_id}.")
    return rows[0]


def _turn_id(turn_id) -> int:
    if turn_id is None or turn_id == "":
        raise FeedbackError("Pick an answer first (its number is missing).")
    try:
        value = int(turn_id)
        if value != turn_id and not isinstance(turn_id, str):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise FeedbackError(f"{turn_id!r} is not an answer number.") from None
    if not -(2**63) <= value <= 2**63 - 1:  # SQLite integers are 64-bit; smaller ones are simply not found
        raise FeedbackError(f"{turn_id!r} is not an answer number.")
    return value


def _vote_value(value: int | str) -> int:
    choices = {"up": UP, "down": DOWN, UP: UP, DOWN: DOWN, "1": UP, "-1": DOWN}
    if isinstance(value, float) and value in (1.0, -1.0):
        value = int(value)
    if isinstance(value, str):
        value = value.strip().lower()
    if isinstance(value, bool) or value not in choices:
        raise FeedbackError(f"A vote is 'up' or 'down', not {value!r}.")
    return choices[value]


def _text(value: str | None, what: str, limit: int) -> str:
    text = (value or "").strip()
    if not text:
        raise FeedbackError(f"The {what} is empty; please write it.")
    if not is_storable(text):
        raise FeedbackError(f"The {what} {NOT_STORABLE}.")
    if len(text) > limit:
        raise FeedbackError(f"The {what} is {len(text)} characters long; the limit is {limit}.")
    return text


def _label(label: str | None) -> str | None:
    label = (label or "").strip() or None
    if label is not None and not is_storable(label):
        raise FeedbackError(f"The label {NOT_STORABLE}.")
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise FeedbackError(f"The label is {len(label)} characters long; the limit is {MAX_LABEL_CHARS}.")
    return label


def _known_spelling(db: sqlite_utils.Database, label: str | None) -> str | None:
    """An existing label as is; a new one only if it is not another spelling of an existing one."""
    return label if label is None or label in labels(db) else check_new_label(db, label)


def _words(text: str | None) -> str:
    return " ".join((text or "").split())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")
