"""The knowledge index: approved question/answer pairs that answers are grounded on.

Entries (table ``knowledge``, owned here), each with the MiniLM vector of its question in the same
row (staff entries are found by their answer too, :func:`scores`):

* ``dataset``: imported and pack examples in the train split of the latest dataset snapshot;
* ``correction``, ``approval``, ``manual``: staff answers, indexed in the transaction that saves
  them (:func:`add_staff_entry`, called by :mod:`feedback.store`), so the next question can use them;
  a newer correction or approval of the same turn replaces the older one;
* ``catalog``: the pack's catalog facts as short passages (:func:`add_catalog`);
* ``added``: pairs added with ``tuneloop knowledge add``.

Never indexed: validation or test rows, customer thumbs-ups no staff member approved. A removed
entry keeps its row with ``removed_at`` set, so no later sync brings it back.

:class:`KnowledgeIndex` searches the live entries exactly (cosine on unit vectors, one matrix
product) from a numpy matrix held in memory; it reloads the matrix when a cheap check of the table
(highest id ever given, live rows, sum of their ids) changes, so a saved correction is used by the
next question.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlite_utils

from assistant import embeddings
from feedback import datasets, dedupe

SOURCES = ("dataset", "correction", "approval", "manual", "catalog", "added")
STAFF_SOURCES = ("correction", "approval", "manual")
ANSWER_SEARCHED = (*STAFF_SOURCES, "added")
"""Entries a person approved, found by their answer as well as their question (:func:`scores`);
serving puts the same ones first (``assistant.chat.STAFF_SOURCES``, kept equal by a test)."""
DIMENSIONS = 384


class KnowledgeError(ValueError):
    """An entry is refused or not found; the message says why."""


@dataclass(frozen=True)
class Reference:
    """One entry found for a question: what a prompt shows and the turn log records."""

    id: int
    question: str
    answer: str
    label: str | None
    source: str
    score: float
    """Cosine similarity of the entry's question to the asked question; for a staff entry, of its
    question or its answer, whichever is closer (:func:`scores`)."""
    by_answer: bool = False
    """The score is its answer's (staff entries only): the asked question resembles what the answer
    says more than the approved question."""

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "score": round(self.score, 4)}


def question_vector(db: sqlite_utils.Database, question: str) -> np.ndarray:
    """The unit vector of a question, through the embedding cache (a text is never embedded twice).

    Call it before taking a write lock: the first call in a process loads the model.
    """
    return dedupe.EmbeddingCache(db).vectors([question])[0]


def add_staff_entry(db: sqlite_utils.Database, kind: str, correction_id: int, turn_id: int | None, question: str,
                    answer: str, label: str | None, vector: np.ndarray) -> None:
    """Index a staff correction, approval or hand-written example; runs inside the caller's transaction
    (:mod:`feedback.store`), so the corrections row and its entry are stored together or not at all.

    A correction or approval replaces the entries of the turn's earlier ones: the latest staff
    answer of a turn is the one trained on, and the one served.
    """
    if kind not in STAFF_SOURCES:
        raise KnowledgeError(f"kind must be one of {STAFF_SOURCES}, not {kind!r}")
    if turn_id is not None:
        db.execute(
            "delete from knowledge where source in ('correction', 'approval') and removed_at is null and source_id in "
            "(select 'corrections:' || id from corrections where turn_id = ? and id != ?)",
            [turn_id, correction_id],
        )
    _insert(db, kind, f"corrections:{correction_id}", question, answer, label, vector)


def add(db: sqlite_utils.Database, question: str, answer: str, label: str | None = None) -> int:
    """Add an approved pair by hand (``tuneloop knowledge add``); returns its id. The same question
    and answer again returns the existing entry."""
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question or not answer:
        raise KnowledgeError("an entry needs a non-empty question and answer")
    label = (label or "").strip() or None
    vector = question_vector(db, question)
    source_id = "added:" + dedupe.content_hash(question, answer)[:16]
    with db.conn:
        # A pair removed earlier and added again is wanted back, as a new entry.
        db.execute("delete from knowledge where source_id = ? and removed_at is not null", [source_id])
        _insert(db, "added", source_id, question, answer, label, vector)
    return int(db.execute("select id from knowledge where source_id = ?", [source_id]).fetchone()[0])


def remove(db: sqlite_utils.Database, entry_id: int) -> dict:
    """Take an entry out of the index (the next question no longer sees it); returns the entry."""
    found = entries(db, entry_id=int(entry_id))
    if not found:
        raise KnowledgeError(f"there is no knowledge entry {entry_id}")
    with db.conn:
        db.execute("update knowledge set removed_at = ? where id = ? and removed_at is null", [_now(), int(entry_id)])
    return found[0]


def erase_entries(db: sqlite_utils.Database, source_ids: list[str]) -> None:
    """Delete the entries made from these rows (``"corrections:7"``), removed ones included: unlike
    :func:`remove`, nothing of the text stays. Runs in the caller's transaction (:func:`feedback.privacy.erase`)."""
    db.conn.executemany("delete from knowledge where source_id = ?", [(source_id,) for source_id in source_ids])


def entries(db: sqlite_utils.Database, entry_id: int | None = None, include_removed: bool = False) -> list[dict]:
    """Entries, oldest first: ``{"id", "source", "source_id", "question", "answer", "label", "created_at", "removed_at"}``."""
    where, params = ["1"], []
    if entry_id is not None:
        where.append("id = ?")
        params.append(entry_id)
    if not include_removed:
        where.append("removed_at is null")
    return list(db.query(
        "select id, source, source_id, question, answer, label, created_at, removed_at from knowledge "
        f"where {' and '.join(where)} order by id",
        params,
    ))


def sync(db: sqlite_utils.Database, snapshot: Path | None = None) -> dict:
    """Bring the index up to date with the stored data: the train split of ``snapshot`` (the latest
    when None) and the current staff answers (those saved before the index existed). Returns counts
    ``{"added", "removed"}``; running it twice changes nothing."""
    snapshot = snapshot if snapshot is not None else datasets.latest_snapshot()
    wanted: list[tuple[str, str, str, str, str | None]] = []  # source, source_id, question, answer, label
    if snapshot is not None:
        held_out = {f"examples:{r[0]}" for r in db.execute("select id from examples where split != 'train'")}
        for row in datasets.load_split(snapshot, "train"):
            # Only imported and pack rows: staff rows are indexed live (below), and thumbs-up rows
            # that no staff member approved never are.
            row_id = str(row["id"])
            if row_id.startswith("examples:") and row_id not in held_out and row.get("source") != "thumbs_up":
                wanted.append(("dataset", row_id, row["question"], row["answer"], row.get("label")))
    for r in db.query(
        """
        select c.id, c.kind, c.question, c.answer, c.label from corrections c
        where c.kind = 'manual' or c.id = (select max(id) from corrections
                                           where turn_id = c.turn_id and kind in ('correction', 'approval'))
        """
    ):
        wanted.append((r["kind"], f"corrections:{r['id']}", r["question"], r["answer"], r["label"]))
    present = {r[0] for r in db.execute("select source_id from knowledge")}
    fresh = [w for w in wanted if w[1] not in present]
    vectors = dedupe.EmbeddingCache(db).vectors([w[2] for w in fresh]) if fresh else []
    keep = {w[1] for w in wanted if w[0] == "dataset"}
    stale = [r[0] for r in db.execute("select source_id from knowledge where source = 'dataset' and removed_at is null")
             if r[0] not in keep]
    with db.conn:
        for (source, source_id, question, answer, label), vector in zip(fresh, vectors):
            _insert(db, source, source_id, question, answer, label, vector)
        # Rows that left the train split leave the index (a removed row keeps its tombstone).
        db.conn.executemany("delete from knowledge where source_id = ? and removed_at is null", [(s,) for s in stale])
    return {"added": len(fresh), "removed": len(stale)}


def catalog_passages(catalog_file: Path, bank: dict | None = None) -> list[tuple[str, str, str | None]]:
    """The catalog as short passages ``(question, answer, label)``: one per product summary and per
    fact ("Peach Checking monthly fee" / "Peach Checking monthly fee: $8, waived ..."), plus the
    bank's own facts (phone, hours, ...) from the pack's ``bank`` table."""
    passages = []
    for product in json.loads(Path(catalog_file).read_text(encoding="utf-8")):
        name, label = product["name"], product.get("label")
        if product.get("summary"):
            passages.append((f"What is {name}?", f"{name}: {product['summary']}", label))
        for key, value in product.get("facts", {}).items():
            topic = f"{name} {key.replace('_', ' ')}"
            passages.append((topic, f"{topic}: {value}", label))
    owner = (bank or {}).get("name", "the bank")
    for key, value in (bank or {}).items():
        if key != "name":
            topic = f"{owner} {key.replace('_', ' ')}"
            passages.append((topic, f"{topic}: {value}", None))
    return passages


def add_catalog(db: sqlite_utils.Database, catalog_file: Path, bank: dict | None = None) -> int:
    """Index the catalog's passages (idempotent); returns how many were new."""
    passages = catalog_passages(catalog_file, bank)
    keyed = [("catalog:" + hashlib.sha256(f"{q}\x1f{a}".encode()).hexdigest()[:16], q, a, label) for q, a, label in passages]
    present = {r[0] for r in db.execute("select source_id from knowledge where source = 'catalog'")}
    fresh = [k for k in keyed if k[0] not in present]
    vectors = dedupe.EmbeddingCache(db).vectors([k[1] for k in fresh]) if fresh else []
    with db.conn:
        for (source_id, question, answer, label), vector in zip(fresh, vectors):
            _insert(db, "catalog", source_id, question, answer, label, vector)
    return len(fresh)


class KnowledgeIndex:
    """Exact nearest-neighbour search over the live entries, for :class:`assistant.chat.ChatService`.

    ``db`` returns this thread's connection (``ThreadLocalDB.get``). The matrix is cached and
    reloaded when the table changes; a new dataset snapshot is synced in on the next question.
    Questions are embedded on one thread the index owns: every thread that runs torch keeps its own
    OpenMP team, and one per chat thread would crowd the model's (see assistant.chat).
    """

    def __init__(self, db: Callable[[], sqlite_utils.Database]):
        self._db = db
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._rows: list[tuple] = []
        self._matrix = np.zeros((0, DIMENSIONS), dtype=np.float32)
        self._answered = np.zeros(0, dtype=np.int64)
        self._answer_matrix = np.zeros((0, DIMENSIONS), dtype=np.float32)
        self._snapshot: object = object()  # the snapshot last synced; a sentinel before the first sync
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge")

    def references(self, question: str, k: int, min_score: float) -> list[Reference]:
        """The ``k`` entries whose questions are closest to ``question`` with cosine >= ``min_score``, best first."""
        if k <= 0:
            return []
        return self._worker.submit(self._search, question, k, min_score).result()

    def has_staff(self) -> bool:
        """Whether any live entry is a staff pair (serving skips a search that could find none)."""
        return self._worker.submit(lambda: len(self._current()[2]) > 0).result()

    def _search(self, question: str, k: int, min_score: float) -> list[Reference]:
        rows, matrix, answered, answer_matrix = self._current()
        if not rows:
            return []
        query = embeddings.embed([dedupe.embedding_text(question)])[0]
        return _nearest(rows, *scores(matrix, answered, answer_matrix, query), k, min_score)

    def _current(self) -> tuple[list[tuple], np.ndarray, np.ndarray, np.ndarray]:
        db = self._db()
        snapshot = datasets.latest_snapshot()
        if snapshot != self._snapshot:
            sync(db, snapshot)
            self._snapshot = snapshot
        # Ids are never reused (AUTOINCREMENT), so any add, removal or replacement changes the highest
        # id ever given, the number of live entries or the sum of their ids.
        key = tuple(db.execute(
            "select (select seq from sqlite_sequence where name = 'knowledge'), count(*), total(id) "
            "from knowledge where removed_at is null"
        ).fetchone())
        with self._lock:
            if key != self._key:
                found = db.execute(
                    "select id, question, answer, label, source, vector from knowledge where removed_at is null order by id"
                ).fetchall()
                self._rows = [tuple(r[:5]) for r in found]
                self._matrix = (np.stack([np.frombuffer(r[5], dtype=np.float32) for r in found])
                                if found else np.zeros((0, DIMENSIONS), dtype=np.float32))
                # Staff answers' vectors come from the embedding cache: each text is embedded once,
                # by the first question after it was saved.
                self._answered = np.array([i for i, r in enumerate(found) if r[4] in ANSWER_SEARCHED], dtype=np.int64)
                self._answer_matrix = dedupe.EmbeddingCache(db).vectors([found[i][2] for i in self._answered])
                self._key = key
            return self._rows, self._matrix, self._answered, self._answer_matrix


class MemoryIndex:
    """Exact search, as :class:`KnowledgeIndex` searches, over entries given in memory instead of the
    table: evaluation's index of a snapshot's train split, which must not change while staff work.
    ``entries`` are ``(question, answer, label, source)`` with their question vectors
    (``dedupe.EmbeddingCache``); a found :class:`Reference`'s ``id`` is its entry's position."""

    def __init__(self, entries: list[tuple[str, str, str | None, str]], vectors: np.ndarray):
        self._rows = [(i, *entry) for i, entry in enumerate(entries)]
        self._matrix = np.asarray(vectors, dtype=np.float32).reshape(len(entries), DIMENSIONS)

    def search(self, query_vectors: np.ndarray, k: int, min_score: float) -> list[list[Reference]]:
        """For each unit query vector, the ``k`` entries with cosine >= ``min_score``, best first."""
        if k <= 0 or not self._rows:
            return [[] for _ in query_vectors]
        return [_nearest(self._rows, self._matrix @ query, None, k, min_score) for query in query_vectors]

    def has_staff(self) -> bool:
        """Whether any entry is a staff pair (:class:`assistant.chat.ReferenceSource`)."""
        return any(row[4] in ANSWER_SEARCHED for row in self._rows)

    def references(self, question: str, k: int, min_score: float) -> list[Reference]:
        """The ``k`` entries closest to ``question`` (:class:`assistant.chat.ReferenceSource`)."""
        if k <= 0 or not self._rows:
            return []
        return self.search(embeddings.embed([dedupe.embedding_text(question)]), k, min_score)[0]


def scores(matrix: np.ndarray, answered: np.ndarray, answer_matrix: np.ndarray,
           query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each entry's cosine to the unit ``query``: its question's, or for the entries ``answered``
    (staff entries, rows of ``answer_matrix`` in that order) its answer's when that is higher;
    and which scores are the answer's.

    A staff pair is one phrasing of its question, while a dataset label has many; its answer
    carries the words a paraphrase uses ("notary service" finds "notarizes documents for $9").
    Measured in benchmarks/retrieval_threshold.py: a correction is found first for more of its
    paraphrases, at little cost to other questions."""
    found = matrix @ query
    by_answer = np.zeros(len(found), dtype=bool)
    if len(answered):
        from_answer = answer_matrix @ query
        higher = from_answer > found[answered]
        found[answered[higher]] = from_answer[higher]
        by_answer[answered[higher]] = True
    return found, by_answer


def _nearest(rows: list[tuple], scored: np.ndarray, by_answer: np.ndarray | None, k: int,
             min_score: float) -> list[Reference]:
    """The ``k`` rows with the highest ``scored`` cosine >= ``min_score``, best first (ties: the older
    row first)."""
    top = np.argsort(-scored, kind="stable")[:k] if len(scored) <= k else np.argpartition(-scored, k)[:k]
    top = sorted(top.tolist(), key=lambda i: (-scored[i], i))
    return [Reference(*rows[i], score=float(scored[i]), by_answer=bool(by_answer is not None and by_answer[i]))
            for i in top if scored[i] >= min_score]


def _insert(db: sqlite_utils.Database, source: str, source_id: str, question: str, answer: str, label: str | None,
            vector: np.ndarray) -> None:
    db.execute(
        "insert or ignore into knowledge (source, source_id, question, answer, label, vector, created_at) "
        "values (?, ?, ?, ?, ?, ?, ?)",
        [source, source_id, question, answer, label, np.asarray(vector, dtype=np.float32).tobytes(), _now()],
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
