"""Importing question/answer examples from CSV and JSONL into the ``examples`` table.

Accepted files:

* CSV with a header row; columns named by ``question_col``, ``answer_col`` and (optional)
  ``label_col``;
* JSONL, one object per line, either with those keys or in chat-messages form
  ``{"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}``
  (one user message and one assistant reply; the system message is ignored because the served
  persona is added at training time).

Every row is validated before anything is written (empty or oversized fields, missing columns,
invalid UTF-8) and every error names its row; a file with any error imports nothing. The rows
that pass go in one transaction. An example is identified by the hash of its normalised question
and answer, so importing a file twice adds nothing the second time. Each new example gets its
split once, here, and keeps it (rules in :mod:`feedback.split`).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlite_utils

from feedback.text import NOT_STORABLE, is_storable

from assistant import progress
from assistant.config import check
from feedback import dedupe, split

SOURCES = ("import", "pack", "manual")
MAX_ERRORS_SHOWN = 20


@dataclass
class ImportConfig:
    val_fraction: float = 0.1
    """Share of new question clusters assigned to the validation split."""
    test_fraction: float = 0.1
    """Share of new question clusters assigned to the test split (first import, or with --into-test)."""
    near_duplicate_threshold: float = dedupe.NEAR_DUPLICATE_THRESHOLD
    """Cosine similarity at or above which two questions are paraphrases and share a split."""
    max_question_chars: int = 2000
    """Longest question accepted; longer rows are reported as errors."""
    max_answer_chars: int = 8000
    """Longest answer accepted; longer rows are reported as errors."""
    max_label_chars: int = 64
    """Longest label accepted."""

    def __post_init__(self) -> None:
        check(0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)")
        check(0.0 <= self.test_fraction < 1.0, "test_fraction must be in [0, 1)")
        check(self.val_fraction + self.test_fraction < 1.0, "val_fraction + test_fraction must leave room for train (< 1)")
        check(0.0 < self.near_duplicate_threshold <= 1.0, "near_duplicate_threshold must be in (0, 1]")
        check(self.max_question_chars >= 1 and self.max_answer_chars >= 1, "max_question_chars and max_answer_chars must be >= 1")
        check(self.max_label_chars >= 1, "max_label_chars must be >= 1")


class DataImportError(ValueError):
    """The file was refused and nothing was imported; ``errors`` lists each bad row."""

    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = errors or [message]
        shown = self.errors[:MAX_ERRORS_SHOWN]
        more = len(self.errors) - len(shown)
        detail = "\n".join(f"  {e}" for e in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{message}; nothing was imported\n{detail}" if errors else f"{message}; nothing was imported")


@dataclass
class ImportResult:
    imported: int = 0
    """New examples written."""
    skipped_duplicates: int = 0
    """Rows whose question and answer were already stored (or repeated in the file)."""
    held_out_near_test: int = 0
    """Rows not imported because they paraphrase a frozen test question (see feedback.split)."""
    splits: dict[str, int] = field(default_factory=lambda: {s: 0 for s in split.SPLITS})
    """New examples per split."""

    def to_json(self) -> dict:
        return {"imported": self.imported, "skipped_duplicates": self.skipped_duplicates,
                "held_out_near_test": self.held_out_near_test, "splits": dict(self.splits)}


def import_file(
    db: sqlite_utils.Database,
    path: Path | str,
    question_col: str = "question",
    answer_col: str = "answer",
    label_col: str | None = None,
    source: str = "import",
    allow_test: bool = False,
    cfg: ImportConfig | None = None,
) -> ImportResult:
    """Validate every row of a CSV or JSONL file, then import the new ones in one transaction.

    ``label_col`` None means "use a ``label`` column when the file has one".
    """
    path = Path(path)
    # Two stages, shown under `tuneloop data import`: reading is quick, embedding the new questions is not.
    with progress.stages("tuneloop data import", 2) as stages:
        stages.start(f"reading {path.name}")
        rows = read_rows(path, question_col, answer_col, label_col)
        stages.start(f"checking {len(rows)} rows, embedding new questions and assigning splits")
        return import_rows(db, rows, source=source, allow_test=allow_test, cfg=cfg, origin=path.name)


def read_rows(path: Path, question_col: str = "question", answer_col: str = "answer", label_col: str | None = None) -> list[dict]:
    """Rows ``{"row", "question", "answer", "label"}`` of a file; raises on structural errors."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataImportError(f"{path.name}: unsupported file type {suffix or '(none)'}; use .csv or .jsonl")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataImportError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataImportError(f"{path.name} is not valid UTF-8", [f"line {line} (byte {exc.start}): invalid UTF-8 bytes; save the file as UTF-8"]) from None
    if suffix == ".csv":
        return _csv_rows(text, question_col, answer_col, label_col, path.name)
    return _jsonl_rows(text, question_col, answer_col, label_col, path.name)


def _csv_rows(text: str, question_col: str, answer_col: str, label_col: str | None, name: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    wanted = [question_col, answer_col] + ([label_col] if label_col else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataImportError(
            f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}; the header has {', '.join(repr(c) for c in header) or 'nothing'}"
            " (choose columns with --question-col/--answer-col/--label-col)"
        )
    label_key = label_col or ("label" if "label" in header else None)
    rows, errors = [], []
    try:
        for number, record in enumerate(reader, start=1):
            if None in record:  # more cells than header columns
                errors.append(f"row {number} (line {reader.line_num}): more cells than header columns")
                continue
            values = {"question": record.get(question_col), "answer": record.get(answer_col),
                      "label": record.get(label_key) if label_key else None}
            if any(values[k] is None for k in ("question", "answer")):
                errors.append(f"row {number} (line {reader.line_num}): fewer cells than header columns")
                continue
            rows.append({"row": f"row {number} (line {reader.line_num})", **values})
    except csv.Error as exc:
        errors.append(f"line {reader.line_num}: malformed CSV ({exc})")
    if errors:
        raise DataImportError(f"{name}: {len(errors)} bad row(s)", errors)
    return rows


def _jsonl_rows(text: str, question_col: str, answer_col: str, label_col: str | None, name: str) -> list[dict]:
    rows, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            errors.append(f"{where}: expected a JSON object")
            continue
        label = record.get(label_col or "label")
        if label_col and label_col not in record:
            errors.append(f"{where}: missing key {label_col!r}")
            continue
        if "messages" in record:
            pair = _chat_pair(record["messages"])
            if isinstance(pair, str):
                errors.append(f"{where}: {pair}")
                continue
            question, answer = pair
        else:
            absent = [k for k in (question_col, answer_col) if k not in record]
            if absent:
                errors.append(f"{where}: missing key(s) {', '.join(repr(k) for k in absent)} (or a 'messages' list)")
                continue
            question, answer = record[question_col], record[answer_col]
        rows.append({"row": where, "question": question, "answer": answer, "label": label})
    if errors:
        raise DataImportError(f"{name}: {len(errors)} bad line(s)", errors)
    return rows


def _chat_pair(messages) -> tuple[str, str] | str:
    """(question, answer) of a single-turn chat, or the reason it is not one."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a list of {role, content} objects"
    turns = [m for m in messages if m.get("role") != "system"]
    roles = [m.get("role") for m in turns]
    if roles != ["user", "assistant"]:
        return f"'messages' must hold one user message then one assistant reply (after an optional system message), not {roles}"
    return turns[0].get("content"), turns[1].get("content")


def validate(rows: Iterable[dict], cfg: ImportConfig) -> list[dict]:
    """Stripped rows, or DataImportError listing every bad row."""
    clean, errors = [], []
    for number, row in enumerate(rows, start=1):
        where = row.get("row") or f"row {number}"
        problems = []
        values = {}
        for key, limit, required in (("question", cfg.max_question_chars, True), ("answer", cfg.max_answer_chars, True),
                                     ("label", cfg.max_label_chars, False)):
            value = row.get(key)
            if value is None and not required:
                values[key] = None
                continue
            if not isinstance(value, str):
                problems.append(f"{key} must be text, not {type(value).__name__}")
                continue
            value = value.strip()
            if not value:
                if required:
                    problems.append(f"empty {key}")
                values[key] = value or None
            elif len(value) > limit:
                problems.append(f"{key} has {len(value)} characters (at most {limit})")
            elif "\x00" in value:
                problems.append(f"{key} contains a NUL character")
            elif not is_storable(value):
                problems.append(f"{key} {NOT_STORABLE}")
            else:
                values[key] = value
        if problems:
            errors.append(f"{where}: {'; '.join(problems)}")
        else:
            clean.append({"row": where, **values})
    if errors:
        raise DataImportError(f"{len(errors)} bad row(s)", errors)
    if not clean:
        raise DataImportError("no rows to import")
    return clean


def import_rows(
    db: sqlite_utils.Database,
    rows: Iterable[dict],
    source: str = "import",
    allow_test: bool = False,
    cfg: ImportConfig | None = None,
    origin: str | None = None,
) -> ImportResult:
    """Import ``{"question", "answer", "label"?}`` rows (all or nothing); returns what was added.

    ``allow_test`` lets this import add to the frozen test set (see :mod:`feedback.split`).
    """
    cfg = cfg or ImportConfig()
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    clean = validate(rows, cfg)
    result = ImportResult()

    fresh: dict[str, dict] = {}
    for row in clean:
        key = dedupe.content_hash(row["question"], row["answer"])
        if key not in fresh:
            fresh[key] = row
    stored = _existing_hashes(db, list(fresh))
    new = {k: r for k, r in fresh.items() if k not in stored}
    result.skipped_duplicates = len(clean) - len(new)
    if not new:
        return result

    cache = dedupe.EmbeddingCache(db)
    keys = list(new)
    new_vectors = cache.vectors([new[k]["question"] for k in keys])
    existing = list(db.query("select question, split from examples order by id"))
    existing_vectors = cache.vectors([r["question"] for r in existing]) if existing else np.zeros((0, new_vectors.shape[1]), np.float32)
    splits = split.assign(new_vectors, keys, existing_vectors, [r["split"] for r in existing],
                          cfg.near_duplicate_threshold, cfg.val_fraction, cfg.test_fraction, allow_test)

    created_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    records = []
    for key, assigned in zip(keys, splits):
        if assigned is None:
            result.held_out_near_test += 1
            continue
        row = new[key]
        records.append((key, dedupe.question_hash(row["question"]), row["question"], row["answer"], row["label"],
                        source, assigned, f"{origin}:{row['row']}" if origin else row["row"], created_at))
    with db.conn:
        # INSERT OR IGNORE: an import running at the same time may have stored the same example.
        before = db.conn.total_changes
        db.conn.executemany(
            "insert or ignore into examples (content_hash, question_hash, question, answer, label, source, split, origin, created_at)"
            " values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            records,
        )
        inserted = db.conn.total_changes - before
    result.imported = inserted
    result.skipped_duplicates += len(records) - inserted
    if inserted == len(records):
        result.splits.update(Counter(r[6] for r in records))
    else:
        result.splits.update(split_counts(db, [r[0] for r in records]))
    return result


def _existing_hashes(db: sqlite_utils.Database, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in db.execute(f"select content_hash from examples where content_hash in ({marks})", chunk).fetchall())
    return found


def split_counts(db: sqlite_utils.Database, content_hashes: list[str] | None = None) -> dict[str, int]:
    """Examples per split (all of them, or those with the given content hashes)."""
    counts = {s: 0 for s in split.SPLITS}
    if content_hashes is None:
        rows = db.execute("select split, count(*) from examples group by split").fetchall()
    else:
        rows = []
        for start in range(0, len(content_hashes), 500):
            chunk = content_hashes[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += db.execute(f"select split, count(*) from examples where content_hash in ({marks}) group by split", chunk).fetchall()
    for name, count in rows:
        counts[name] = counts.get(name, 0) + count
    return counts
