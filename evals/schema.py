"""Numbered, named migrations of the evaluation tables (sqlite-utils ``Migrations("tuneloop-evals")``).

They live in the same ``feedback.db`` as the feedback tables (one file to back up, and the staff view
reads decisions and reviews through :mod:`feedback.review`), but in their own migration set so the
two sets never collide. Never edit an applied migration: add the next number.
"""

from __future__ import annotations

from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from feedback.db import connect as connect_feedback

migrations = Migrations("tuneloop-evals")


@migrations(name="0001_retrain_and_gate")
def m0001_retrain_and_gate(db: sqlite_utils.Database) -> None:
    # One row per `tuneloop retrain`; status running -> done | noop | failed. A run killed with -9
    # stays "running" until the next run sees its pid is gone and marks it failed.
    db["retrain_runs"].create(
        {
            "id": int,
            "status": str,
            "stage": str,
            "pid": int,
            "started_at": str,
            "finished_at": str,
            "dataset": str,
            "dataset_sha256": str,
            "candidate": str,
            "incumbent": str,
            "promoted": int,
            "reasons": str,
            "f1": str,
            "error": str,
            "seconds": float,
            "config": str,
        },
        pk="id",
        not_null={"status", "stage", "pid", "started_at"},
        defaults={"promoted": 0},
    )
    db["retrain_runs"].create_index(["status"])
    # Every promotion decision, rejections included, with the reasons a person reads.
    db["gate_decisions"].create(
        {
            "id": int,
            "run_id": int,
            "candidate": str,
            "incumbent": str,
            "promote": int,
            "reasons": str,
            "metrics": str,
            "config": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "retrain_runs", "id")],
        not_null={"candidate", "promote", "reasons", "metrics", "created_at"},
    )
    db["gate_decisions"].create_index(["candidate"])
    # One row per (system, test set) evaluation; `adapter` is a version, or NULL for the base model.
    db["eval_reports"].create(
        {
            "id": int,
            "run_id": int,
            "role": str,
            "adapter": str,
            "dataset": str,
            "n": int,
            "f1": float,
            "label_f1": float,
            "answer_f1": float,
            "rouge_l": float,
            "bleu": float,
            "latency_s": float,
            "tokens_per_answer": float,
            "prompt_tokens": float,
            "perplexity": float,
            "report": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "retrain_runs", "id")],
        not_null={"role", "dataset", "n", "f1", "report", "created_at"},
    )
    db["eval_reports"].create_index(["adapter"])


@migrations(name="0002_human_review")
def m0002_human_review(db: sqlite_utils.Database) -> None:
    # A blind side-by-side pair: which adapter is on the left is decided at random when the pair is
    # made and never shown to the reviewer.
    db["review_pairs"].create(
        {
            "id": int,
            "batch": str,
            "question": str,
            "reference": str,
            "left_adapter": str,
            "left_answer": str,
            "right_adapter": str,
            "right_answer": str,
            "created_at": str,
        },
        pk="id",
        not_null={"batch", "question", "left_answer", "right_answer", "created_at"},
    )
    db["review_pairs"].create_index(["batch"])
    db["review_marks"].create(
        {"id": int, "pair_id": int, "side": str, "staff_user": str, "helpful": int, "created_at": str},
        pk="id",
        foreign_keys=[("pair_id", "review_pairs", "id")],
        not_null={"pair_id", "side", "staff_user", "helpful", "created_at"},
    )
    # One mark per reviewer and side: marking again replaces the earlier mark.
    db["review_marks"].create_index(["pair_id", "side", "staff_user"], unique=True)


def apply(db: sqlite_utils.Database) -> None:
    """Bring ``db`` to the latest evaluation schema; applying twice changes nothing."""
    migrations.apply(db)


def connect(path: Path | str | None = None) -> sqlite_utils.Database:
    """The feedback database with both migration sets applied (``":memory:"`` for tests)."""
    db = connect_feedback(path)
    apply(db)
    return db
