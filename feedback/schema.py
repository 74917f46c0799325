"""Numbered, named migrations of the feedback database (sqlite-utils ``Migrations``).

Never edit an applied migration: add the next number. ``tests/test_schema.py`` pins the result.
"""

from __future__ import annotations

import sqlite_utils
from sqlite_utils import Migrations

migrations = Migrations("tuneloop")


@migrations(name="0001_capture")
def m0001_capture(db: sqlite_utils.Database) -> None:
    db["sessions"].create(
        {"id": str, "kind": str, "created_at": str},
        pk="id",
        not_null={"kind", "created_at"},
    )
    db["turns"].create(
        {
            "id": int,
            "session_id": str,
            "question": str,
            "answer": str,
            "history": str,
            "adapter": str,
            "base_model": str,
            "status": str,
            "error": str,
            "latency_s": float,
            "first_token_s": float,
            "tokens_in": int,
            "tokens_out": int,
            "created_at": str,
            "finished_at": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
        not_null={"session_id", "question", "status", "created_at"},
    )
    db["turns"].create_index(["session_id"])
    db["turns"].create_index(["created_at"])
    db["votes"].create(
        {
            "id": int,
            "turn_id": int,
            "session_id": str,
            "value": int,
            "reason": str,
            "flagged": int,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("turn_id", "turns", "id"), ("session_id", "sessions", "id")],
        not_null={"turn_id", "session_id", "value", "created_at"},
        defaults={"flagged": 0},
    )
    db["votes"].create_index(["turn_id", "session_id"])
    db["staff_users"].create(
        {"name": str, "password_hash": str, "created_at": str, "disabled": int},
        pk="name",
        not_null={"password_hash", "created_at"},
        defaults={"disabled": 0},
    )
    db["corrections"].create(
        {
            "id": int,
            "turn_id": int,
            "kind": str,
            "question": str,
            "answer": str,
            "label": str,
            "staff_user": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("turn_id", "turns", "id"), ("staff_user", "staff_users", "name")],
        not_null={"kind", "question", "answer", "staff_user", "created_at"},
    )
    db["corrections"].create_index(["turn_id"])
    db["signin_attempts"].create(
        {"id": int, "name": str, "ok": int, "created_at": str},
        pk="id",
        not_null={"name", "ok", "created_at"},
    )
    db["signin_attempts"].create_index(["name", "created_at"])


@migrations(name="0002_examples")
def m0002_examples(db: sqlite_utils.Database) -> None:
    # Imported, pack and staff-added examples; the split is decided once, at import, and never moves.
    db["examples"].create(
        {
            "id": int,
            "content_hash": str,
            "question_hash": str,
            "question": str,
            "answer": str,
            "label": str,
            "source": str,
            "split": str,
            "origin": str,
            "created_at": str,
        },
        pk="id",
        not_null={"content_hash", "question_hash", "question", "answer", "source", "split", "created_at"},
    )
    db["examples"].create_index(["content_hash"], unique=True)
    db["examples"].create_index(["question_hash"])
    db["examples"].create_index(["split"])
    # Embeddings of normalised questions keyed by the text's hash, so nothing is embedded twice.
    db["embeddings"].create(
        {"hash": str, "model": str, "vector": bytes},
        pk=("hash", "model"),
        not_null={"vector"},
    )
    db["dataset_versions"].create(
        {
            "version": str,
            "path": str,
            "manifest_sha256": str,
            "train": int,
            "val": int,
            "test": int,
            "created_at": str,
        },
        pk="version",
        not_null={"path", "manifest_sha256", "created_at"},
    )


@migrations(name="0003_human_review")
def m0003_human_review(db: sqlite_utils.Database) -> None:
    # The blind side-by-side review's tables, owned here since staff mark pairs from the app, which
    # may import only feedback; feedback.review writes both (evals.review picks the pairs and hands
    # them over). They came from the evaluation set's 0002_human_review, which now creates nothing:
    # a database made before the move holds both tables exactly as below and keeps them.
    if db["review_pairs"].exists():
        return
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


@migrations(name="0004_web_security")
def m0004_web_security(db: sqlite_utils.Database) -> None:
    # Staff sign-ins as server-side sessions (feedback.auth): the browser holds a random token in an
    # HttpOnly cookie, the table holds only its sha256, so a copy of the database signs nobody in.
    db["staff_sessions"].create(
        {"token_hash": str, "name": str, "address": str, "created_at": str, "expires_at": str},
        pk="token_hash",
        foreign_keys=[("name", "staff_users", "name")],
        not_null={"name", "created_at", "expires_at"},
    )
    db["staff_sessions"].create_index(["name"])
    db["staff_sessions"].create_index(["expires_at"])
    # The client address of a sign-in attempt and of a chat session: sign-in hash budgets and
    # vote limits per address, not only per name or per (easily renewed) session.
    db["signin_attempts"].add_column("address", str)
    db["signin_attempts"].create_index(["address", "created_at"])
    db["signin_attempts"].create_index(["created_at"])
    db["sessions"].add_column("address", str)
    db["sessions"].create_index(["address", "created_at"])
    db["votes"].create_index(["created_at"])


@migrations(name="0005_knowledge")
def m0005_knowledge(db: sqlite_utils.Database) -> None:
    # The approved question/answer pairs answers are grounded on (feedback.knowledge), each with its
    # MiniLM vector (float32 bytes) in the same row, so a pair and its vector are stored together.
    # ``source_id`` names where the pair came from ("examples:12", "corrections:3", "catalog:..."):
    # a removed pair keeps its row with ``removed_at`` set, so no later sync brings it back.
    # AUTOINCREMENT (not sqlite-utils' plain rowid): an id is never reused after a delete, which is
    # what lets a server notice any change of the table from its highest id, count and id sum.
    db.execute(
        """
        CREATE TABLE "knowledge" (
           "id" INTEGER PRIMARY KEY AUTOINCREMENT,
           "source" TEXT NOT NULL,
           "source_id" TEXT NOT NULL,
           "question" TEXT NOT NULL,
           "answer" TEXT NOT NULL,
           "label" TEXT,
           "vector" BLOB NOT NULL,
           "created_at" TEXT NOT NULL,
           "removed_at" TEXT
        )
        """
    )
    db["knowledge"].create_index(["source_id"], unique=True)
    # The references an answer was given (JSON list of {"id", "score"}), beside the adapter.
    db["turns"].add_column("sources", str)


@migrations(name="0006_api_keys")
def m0006_api_keys(db: sqlite_utils.Database) -> None:
    # Keys of the bank's own channels for the OpenAI-compatible API (feedback.apikeys): the table
    # holds only each key's sha256, so a copy of the database calls nothing. A revoked key keeps its
    # row (revoked_at set) so its name is never silently reused for a different client.
    db["api_keys"].create(
        {"name": str, "key_hash": str, "per_minute": int, "created_at": str, "revoked_at": str, "last_used_at": str},
        pk="name",
        not_null={"key_hash", "per_minute", "created_at"},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    # The key a session was opened with (NULL for the web chat and the CLI): an API client's earlier
    # answers are trusted only when they are this key's own logged turns, and votes go only to them.
    db["sessions"].add_column("api_key", str)
    db["sessions"].create_index(["api_key"])


@migrations(name="0007_erasures")
def m0007_erasures(db: sqlite_utils.Database) -> None:
    # Each erasure of customer text (feedback.privacy): what was erased (ids), when and by whom,
    # never the text. ``row_ids`` are the dataset row ids ("turns:3", "corrections:7") it removed,
    # so the adapters trained on snapshots that held them can be named until a retrain replaces them.
    db["erasures"].create(
        {
            "id": int,
            "kind": str,
            "target": str,
            "turn_ids": str,
            "row_ids": str,
            "snapshots": str,
            "erased_by": str,
            "created_at": str,
        },
        pk="id",
        not_null={"kind", "turn_ids", "row_ids", "snapshots", "created_at"},
    )
    db["erasures"].create_index(["created_at"])


@migrations(name="0008_review_actions")
def m0008_review_actions(db: sqlite_utils.Database) -> None:
    # Every staff decision on a queued answer (feedback.store): a correction or approval (with its
    # corrections row), or a rejection (no row: it is never trained on), with who and when. Undo
    # marks the action undone (who and when too) instead of deleting it, so the history stays.
    db["review_actions"].create(
        {
            "id": int,
            "turn_id": int,
            "action": str,
            "correction_id": int,
            "staff_user": str,
            "created_at": str,
            "undone_by": str,
            "undone_at": str,
        },
        pk="id",
        not_null={"turn_id", "action", "staff_user", "created_at"},
        foreign_keys=[("turn_id", "turns", "id")],
    )
    db["review_actions"].create_index(["turn_id", "staff_user"])


@migrations(name="0009_test_api_keys")
def m0009_test_api_keys(db: sqlite_utils.Database) -> None:
    # A key for monitoring probes and automated tests: its sessions are of kind "test", hidden from
    # the review queue by default and never trained on (feedback.store.HIDDEN_KINDS).
    db["api_keys"].add_column("test", int, not_null_default=0)


def apply(db: sqlite_utils.Database) -> None:
    """Bring ``db`` to the latest schema; applying twice changes nothing."""
    migrations.apply(db)
