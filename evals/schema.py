"""Numbered, named migrations of the evaluation tables (sqlite-utils ``Migrations("tuneloop-evals")``).

They live in the same ``feedback.db`` as the feedback tables (one file to back up, and the staff view
reads decisions through :mod:`feedback.review`), but in their own migration set so the two sets never
collide. Never edit an applied migration: add the next number (0002 is the one exception, emptied
when feedback took over the review tables; see there).
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
    # Created review_pairs and review_marks until feedback took them over (feedback.schema's
    # 0003_human_review: staff write marks from the app, which may import only feedback). Kept, empty,
    # under its name: databases that applied it keep the tables it made, identical to feedback's,
    # and a new database gets them from feedback's set, which runs first (:func:`connect` opens the
    # database through feedback.db.connect, which applies it).
    pass


def apply(db: sqlite_utils.Database) -> None:
    """Bring ``db`` to the latest evaluation schema; applying twice changes nothing."""
    migrations.apply(db)


def connect(path: Path | str | None = None) -> sqlite_utils.Database:
    """The feedback database with both migration sets applied (``":memory:"`` for tests)."""
    db = connect_feedback(path)
    apply(db)
    return db
