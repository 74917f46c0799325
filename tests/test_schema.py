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


if __name__ == "__main__":
    print(current_schema(), end="")
