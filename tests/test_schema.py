"""The database schema is pinned: a blank database migrated by both migration sets must match
``tests/expected_schema.sql`` exactly, and re-applying the migrations changes nothing.

A deliberate schema change adds a numbered migration and regenerates the pin with
``python tests/test_schema.py > tests/expected_schema.sql``.
"""

from __future__ import annotations

from pathlib import Path

PINNED = Path(__file__).with_name("expected_schema.sql")


def current_schema(path=":memory:") -> str:
    from evals import schema as evals_schema

    db = evals_schema.connect(path)
    rows = db.execute(
        "select type, name, sql from sqlite_master where sql is not null and name not like 'sqlite_%' order by type, name"
    ).fetchall()
    return "".join(f"-- {kind} {name}\n{sql};\n" for kind, name, sql in rows)


def test_blank_database_migrates_to_the_pinned_schema():
    assert current_schema() == PINNED.read_text(encoding="utf-8")


def test_reapplying_migrations_changes_nothing(tuneloop_home):
    from evals import schema as evals_schema
    from feedback import db as feedback_db

    from assistant import paths

    file = paths.feedback_db()
    first = current_schema(file)
    db = feedback_db.connect(file)
    evals_schema.apply(db)
    applied = db.execute("select count(*) from _sqlite_migrations").fetchone()[0]
    assert current_schema(file) == first
    assert feedback_db.connect(file).execute("select count(*) from _sqlite_migrations").fetchone()[0] == applied


def test_a_database_from_before_feedback_owned_the_review_tables_keeps_them(tuneloop_home):
    """Until feedback's 0003_human_review, the evaluation set's 0002_human_review created the review
    tables (kept here as it was). Such a database migrates to the same pinned schema, its rows intact,
    and feedback's own set now gives every database the tables the app writes."""
    import sqlite_utils
    from evals import schema as evals_schema
    from feedback import db as feedback_db
    from feedback import schema as feedback_schema
    from sqlite_utils import Migrations

    from assistant import paths

    old_evals = Migrations("tuneloop-evals")
    old_evals(name="0001_retrain_and_gate")(evals_schema.m0001_retrain_and_gate)

    @old_evals(name="0002_human_review")
    def old_0002(db: sqlite_utils.Database) -> None:
        db["review_pairs"].create(
            {"id": int, "batch": str, "question": str, "reference": str, "left_adapter": str, "left_answer": str,
             "right_adapter": str, "right_answer": str, "created_at": str},
            pk="id", not_null={"batch", "question", "left_answer", "right_answer", "created_at"},
        )
        db["review_pairs"].create_index(["batch"])
        db["review_marks"].create(
            {"id": int, "pair_id": int, "side": str, "staff_user": str, "helpful": int, "created_at": str},
            pk="id", foreign_keys=[("pair_id", "review_pairs", "id")],
            not_null={"pair_id", "side", "staff_user", "helpful", "created_at"},
        )
        db["review_marks"].create_index(["pair_id", "side", "staff_user"], unique=True)

    file = paths.feedback_db()
    old = feedback_db.connect(file, migrate=False)
    feedback_schema.migrations.apply(old, stop_before="0003_human_review")
    old_evals.apply(old)
    old["review_pairs"].insert({"batch": "b", "question": "q", "left_answer": "l", "right_answer": "r", "created_at": "t"})
    old.close()

    assert current_schema(file) == PINNED.read_text(encoding="utf-8")
    db = evals_schema.connect(file)
    assert [row["question"] for row in db["review_pairs"].rows] == ["q"]
    assert "0003_human_review" in {m.name for m in feedback_schema.migrations.applied(db)}
    fresh = feedback_db.connect(":memory:")  # the app's connection: feedback's migrations only
    assert {"review_pairs", "review_marks"} <= set(fresh.table_names())


if __name__ == "__main__":
    print(current_schema(), end="")
