"""The feedback database: ``$TUNELOOP_HOME/feedback.db``, written with sqlite-utils.

WAL mode (readers never block the writer), a busy timeout (writers queue instead of failing with
"database is locked") and foreign keys on. Schema changes only through the numbered migrations in
:mod:`feedback.schema`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlite_utils

from assistant import paths

BUSY_TIMEOUT_MS = 30_000


def connect(path: Path | str | None = None, migrate: bool = True) -> sqlite_utils.Database:
    """Open (and migrate) the feedback database; ``":memory:"`` for an in-memory one."""
    from feedback import schema

    target = path or paths.feedback_db()
    if str(target) == ":memory:":
        db = sqlite_utils.Database(memory=True)
    else:
        db = sqlite_utils.Database(str(target))
        db.enable_wal()
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash loses no committed transaction
    if migrate:
        schema.apply(db)
    return db


class ThreadLocalDB:
    """One connection per thread (sqlite3 connections must not cross threads), migrated once."""

    def __init__(self, path: Path | str | None = None):
        self.path = str(path or paths.feedback_db())
        self._local = threading.local()
        connect(self.path).close()

    def get(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, migrate=False)
        return db
