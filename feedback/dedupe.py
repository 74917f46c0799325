"""Exact and near-duplicate questions: content hashes first, then cached MiniLM embeddings.

Exact duplicates are caught by a hash of the normalised text before anything is embedded, and every
embedding is cached in SQLite (table ``embeddings``) under the hash of the text it was computed
from, so no text is embedded twice.

Two questions are near-duplicates when the cosine similarity of their all-MiniLM-L6-v2 embeddings
is at least :data:`NEAR_DUPLICATE_THRESHOLD`. What is embedded is the normalised question with every
number replaced by ``0`` (:func:`embedding_text`): order, invoice and amount numbers are fillers,
not meaning, and left in they pull paraphrases apart.

The threshold was chosen on real Bitext paraphrases by ``benchmarks/dedupe_threshold.py`` (figures
in docs/results.md; the precision floor is pinned by ``tests/test_curate.py``). No threshold gives
both precision and recall, and it is set for precision: collapsing deletes training rows, so a
false "duplicate" costs real data. The price is recall: the split and decontamination guards catch
paraphrases that differ in numbers, case, spacing or a word of a longer question, and miss most
that differ in a named entity or a typo of a short one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import sqlite_utils

from assistant import embeddings

NEAR_DUPLICATE_THRESHOLD = 0.90
_NUMBER = re.compile(r"[#$]?\d[\d,.\-/]*")
_LOOKUP_CHUNK = 500  # stays under SQLite's bound-parameter limit
_BLOCK = 512  # rows per similarity block: 512 x 50k float32 is 100 MB at most


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form hashed and embedded."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def embedding_text(question: str) -> str:
    """What is embedded for a question: normalised, every number replaced by ``0``."""
    return _NUMBER.sub("0", normalize(question))


def question_hash(question: str) -> str:
    """Hash of the normalised question: the key of exact-duplicate questions and of the cache."""
    return hashlib.sha256(normalize(question).encode("utf-8")).hexdigest()


def content_hash(question: str, answer: str) -> str:
    """Hash of the normalised question and answer: one example, whatever its whitespace or case."""
    joined = normalize(question) + "\x1f" + normalize(answer)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings of questions, cached in the ``embeddings`` table by the hash of the embedded text."""

    def __init__(self, db: sqlite_utils.Database, persist: bool = True):
        self.db = db
        self.persist = persist
        self.hits = 0
        self.misses = 0
        self._memo: dict[str, np.ndarray] = {}  # this run's vectors, so a dry run embeds each text once

    def vectors(self, questions: list[str]) -> np.ndarray:
        """One unit-norm row per question; only texts never seen before are embedded."""
        texts = [embedding_text(q) for q in questions]
        keys = [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in texts]
        found = {k: self._memo[k] for k in set(keys) if k in self._memo}
        found.update(self._lookup(sorted(set(keys) - set(found))))
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key not in found and key not in missing:
                missing[key] = text
        self.hits += len(set(keys)) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = embeddings.embed(list(missing.values()))
            found.update(zip(missing, fresh))
            self._memo.update(zip(missing, fresh))
            if self.persist:
                self._store(dict(zip(missing, fresh)))
        if not keys:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([found[key] for key in keys]).astype(np.float32)

    def _lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"select hash, vector from embeddings where model = ? and hash in ({marks})",
                [embeddings.EMBEDDING_MODEL_NAME, *chunk],
            ).fetchall()
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def _store(self, vectors: dict[str, np.ndarray]) -> None:
        with self.db.conn:
            self.db.conn.executemany(
                "insert or ignore into embeddings (hash, model, vector) values (?, ?, ?)",
                [(key, embeddings.EMBEDDING_MODEL_NAME, vec.astype(np.float32).tobytes()) for key, vec in vectors.items()],
            )


def forget(db: sqlite_utils.Database, questions: list[str]) -> None:
    """Delete the cached embeddings of these questions (every model's); a question asked again is
    embedded again. Runs in the caller's transaction (:func:`feedback.privacy.erase`)."""
    keys = {hashlib.sha256(embedding_text(q).encode("utf-8")).hexdigest() for q in questions}
    db.conn.executemany("delete from embeddings where hash = ?", [(key,) for key in sorted(keys)])


def nearest(queries: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the highest cosine similarity to any reference row and its index."""
    if len(refs) == 0 or len(queries) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32), np.full(len(queries), -1, dtype=np.int64)
    best = np.empty(len(queries), dtype=np.float32)
    where = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), _BLOCK):
        sims = queries[start : start + _BLOCK] @ refs.T
        where[start : start + _BLOCK] = sims.argmax(axis=1)
        best[start : start + _BLOCK] = sims.max(axis=1)
    return best, where


def components(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph "similarity >= threshold": a label per row.

    Chains count (a~b and b~c put a and c together), which is what keeping paraphrases in one
    split needs: no pair above the threshold may end up in two splits. Each component is labelled
    by its smallest row index.

    Similarities are computed a block of rows at a time and each block's pairs are merged into the
    labels at once, so memory is bounded by the block (``_BLOCK`` x n), not by the number of pairs:
    one question asked 8,000 times is 32 million pairs.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    n = len(vectors)
    labels = np.arange(n)  # each row's component so far, named by its smallest row
    for start in range(0, n, _BLOCK):
        block_labels, later_labels = labels[start : start + _BLOCK], labels[start:]
        close = vectors[start : start + _BLOCK] @ vectors[start:].T >= threshold
        # Pairs inside one component already change nothing; dropping them before listing pairs keeps
        # a big cluster from being listed again in every block.
        close &= block_labels[:, None] != later_labels[None, :]
        rows, cols = np.nonzero(close)
        if len(rows) == 0:
            continue
        # A graph on component names: connecting them merges the components they name.
        graph = coo_array((np.ones(len(rows), np.float32), (block_labels[rows], later_labels[cols])), shape=(n, n))
        _, merged = connected_components(graph, directed=False)
        _, smallest = np.unique(merged, return_index=True)  # first occurrence = smallest name in each
        labels = smallest[merged][labels]
    return labels


def greedy_collapse(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Keep rows in the given order unless near a row already kept; returns, per row, -1 if kept
    or the index of the kept row it duplicates.

    Rows must come best first (the caller sorts gold before silver, newest first). Unlike
    :func:`components` this does not chain: a row is dropped only for a kept row it is itself
    close to, so two different questions are never merged through a string of paraphrases.
    """
    n = len(vectors)
    dup_of = np.full(n, -1, dtype=np.int64)
    kept: list[int] = []
    for start in range(0, n, _BLOCK):
        block = vectors[start : start + _BLOCK]
        if kept:
            best, where = nearest(block, vectors[kept])
            hit = best >= threshold
            dup_of[start : start + _BLOCK][hit] = np.asarray(kept)[where[hit]]
        inner = block @ block.T
        for i in range(len(block)):
            if dup_of[start + i] != -1:
                continue
            kept.append(start + i)
            later = np.nonzero((inner[i, i + 1 :] >= threshold) & (dup_of[start + i + 1 : start + len(block)] == -1))[0]
            dup_of[start + i + 1 + later] = start + i
    return dup_of
