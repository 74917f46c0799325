"""What the staff view shows about retraining, and the blind side-by-side human review.

The retraining tables (``retrain_runs``, ``gate_decisions``, ``eval_reports``) are created and
written by the evaluation side (``evals.schema``); this module only reads them, so the app can show
them without importing ``evals``. Before the first retrain they do not exist yet and every reader
returns "nothing yet".

The review tables (``review_pairs``, ``review_marks``) are this module's: created by feedback's own
migrations and written only here. Staff marks come from the app, which may import only
``assistant`` and ``feedback``, so their table must be feedback's; the pairs they point at live
beside them (``evals.review`` picks the pairs and hands them to :func:`add_review_pairs`).
"""

from __future__ import annotations

import difflib
import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from assistant import paths

F1_HISTORY_PNG = "f1_history.png"


def word_diff_html(answer: str | None, correction: str | None) -> str:
    """The words removed from ``answer`` (``<del>``) and added by ``correction`` (``<ins>``), as
    escaped HTML: both texts may hold a customer's or the model's markup."""
    old, new = (answer or "").split(), (correction or "").split()
    if not new:
        return ""
    parts = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            parts.append(f"<del>{html.escape(' '.join(old[a1:a2]))}</del>")
        if op in ("insert", "replace"):
            parts.append(f"<ins>{html.escape(' '.join(new[b1:b2]))}</ins>")
        if op == "equal":
            parts.append(html.escape(" ".join(old[a1:a2])))
    return " ".join(parts)


class ReviewError(ValueError):
    """A review mark is refused; the message says why."""


def _has(db: sqlite_utils.Database, *tables: str) -> bool:
    names = set(db.table_names())
    return all(table in names for table in tables)


@dataclass
class StoredDecision:
    """A gate decision as ``evals.gate.record_decision`` stored it, read back for staff."""

    candidate: str
    incumbent: str | None
    """The adapter it was compared with; None for the base model."""
    promote: bool
    reasons: list[str]
    """One line per check, passed or failed."""
    metrics: dict
    created_at: str


def last_decision(db: sqlite_utils.Database) -> StoredDecision | None:
    """The newest gate decision, promotion or rejection; None before the first."""
    if not _has(db, "gate_decisions"):
        return None
    rows = list(db.query("select * from gate_decisions order by id desc limit 1"))
    if not rows:
        return None
    row = rows[0]
    return StoredDecision(
        candidate=row["candidate"],
        incumbent=row["incumbent"],
        promote=bool(row["promote"]),
        reasons=json.loads(row["reasons"]),
        metrics=json.loads(row["metrics"]),
        created_at=row["created_at"],
    )


def retrain_text(db: sqlite_utils.Database) -> str:
    """The newest retrain run in one line: running (and at which stage), or how it ended."""
    if not _has(db, "retrain_runs"):
        return "No retrain has run yet."
    rows = list(db.query("select * from retrain_runs order by id desc limit 1"))
    if not rows:
        return "No retrain has run yet."
    run = rows[0]
    if run["status"] == "running":
        return f"Run {run['id']} running since {run['started_at']}: {run['stage']} (dataset {run['dataset'] or '...'})"
    outcome = {1: "promoted", 0: "not promoted"}.get(run["promoted"], "")
    return (f"Run {run['id']} {run['status']} at {run['finished_at']}"
            + (f", {run['candidate']} {outcome}" if run["candidate"] else "")
            + (f" ({run['error']})" if run["error"] else ""))


def decision_text(decision: StoredDecision | None) -> str:
    """The decision as a few lines of plain text for the staff view."""
    if decision is None:
        return "No retrain has run yet."
    verdict = "promoted" if decision.promote else "rejected"
    head = f"{decision.candidate} {verdict} at {decision.created_at} (against {decision.incumbent or 'the base model'})"
    return "\n".join([head] + [f"- {reason}" for reason in decision.reasons])


def f1_history(db: sqlite_utils.Database) -> list[dict]:
    """Gate F1 of every evaluated system, oldest first: ``{"created_at", "role", "adapter", "f1", "run_id"}``."""
    if not _has(db, "eval_reports"):
        return []
    return list(db.query(
        "select created_at, role, coalesce(adapter, 'base') as adapter, f1, run_id from eval_reports order by id"
    ))


def f1_history_png() -> Path | None:
    """The F1-across-versions plot the last report wrote, if any."""
    file = paths.reports_dir() / F1_HISTORY_PNG
    return file if file.exists() else None


@dataclass
class ReviewPair:
    """Two systems' answers to one test question, in the order they are shown (left, right)."""

    question: str
    reference: str | None
    left_adapter: str | None
    """None for the base model; never shown to the reviewer."""
    left_answer: str
    right_adapter: str | None
    right_answer: str


def add_review_pairs(db: sqlite_utils.Database, batch: str, pairs: list[ReviewPair]) -> None:
    """Store ``pairs`` for blind review under the name ``batch``; the one writer of ``review_pairs``."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    db["review_pairs"].insert_all({"batch": batch, **vars(pair), "created_at": now} for pair in pairs)


def next_pair(db: sqlite_utils.Database, staff_user: str) -> dict | None:
    """The oldest review pair ``staff_user`` has not marked both sides of, without adapter names
    (the review is blind): ``{"pair_id", "question", "left", "right"}``; None when all are done."""
    rows = list(db.query(
        """
        select p.id, p.question, p.left_answer, p.right_answer from review_pairs p
        where (select count(*) from review_marks m where m.pair_id = p.id and m.staff_user = ?) < 2
        order by p.id limit 1
        """,
        [staff_user],
    ))
    if not rows:
        return None
    row = rows[0]
    return {"pair_id": row["id"], "question": row["question"], "left": row["left_answer"], "right": row["right_answer"]}


def mark_pair(db: sqlite_utils.Database, staff_user: str, pair_id: int, left_helpful: bool, right_helpful: bool) -> None:
    """Record whether each side was "accurate and helpful"; marking again replaces the earlier marks.
    The one writer of ``review_marks``."""
    if not staff_user:
        raise ReviewError("Sign in as staff to review answers.")
    if pair_id is None:
        raise ReviewError("Open a pair first (Next pair).")
    if db["review_pairs"].count_where("id = ?", [int(pair_id)]) == 0:
        raise ReviewError(f"There is no review pair {pair_id}.")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with db.conn:
        for side, helpful in (("left", left_helpful), ("right", right_helpful)):
            db.execute(
                "insert into review_marks (pair_id, side, staff_user, helpful, created_at) values (?, ?, ?, ?, ?) "
                "on conflict (pair_id, side, staff_user) do update set helpful = excluded.helpful, created_at = excluded.created_at",
                [int(pair_id), side, staff_user, int(bool(helpful)), now],
            )


def helpful_shares(db: sqlite_utils.Database) -> list[dict]:
    """Per adapter: marks received and the share marked accurate and helpful, most marked first."""
    return list(db.query(
        """
        select coalesce(case m.side when 'left' then p.left_adapter else p.right_adapter end, 'base') as adapter,
               count(*) as marks, avg(m.helpful) as helpful_share
        from review_marks m join review_pairs p on p.id = m.pair_id
        group by 1 order by marks desc, adapter
        """
    ))
