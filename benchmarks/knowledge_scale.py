"""The knowledge index at scale: p50/p99 of a customer question's search at 1k, 10k and 100k entries,
and how long a correction takes to become searchable there (issue 24: exact search up to 100k).

The real :class:`feedback.knowledge.KnowledgeIndex` over a real SQLite file in a temporary
``$TUNELOOP_HOME``; entries are the pack's questions and answers repeated with random unit vectors
(search cost depends on the count, not the text). Per size it prints:

* ``search``: the matrix product and top-k alone (``_nearest``), over random unit queries;
* ``question``: a whole ``references()`` call as a customer's question makes it (MiniLM embedding on
  the index's thread, then the search), over the pack's questions;
* ``reload``: the first question after a staff correction was added (the index reloads its matrix
  from SQLite), i.e. the delay before a correction answers customers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/knowledge_scale.py [--sizes 1000 10000 100000] [--queries 200]

sqlite-vec (vectors searched inside SQLite) was the other candidate; this interpreter's sqlite3 is
built without loadable extensions (``enable_load_extension`` is missing), so it cannot be measured or
used here, and the numpy matrix stays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACK_QA = REPO / "assistant" / "packs" / "peach_state_bank" / "qa.jsonl"


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def fill(db, size: int, pairs: list[tuple[str, str]], rng: np.random.Generator) -> None:
    from feedback import knowledge

    vectors = rng.standard_normal((size, knowledge.DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with db.conn:
        for i in range(size):
            question, answer = pairs[i % len(pairs)]
            knowledge._insert(db, "bench", f"bench:{i}", question, answer, None, vectors[i])


def measure(size: int, queries: int, pairs: list[tuple[str, str]], rng: np.random.Generator) -> dict:
    from feedback import knowledge
    from feedback.db import ThreadLocalDB

    local = ThreadLocalDB()  # the index searches on a thread of its own, as in the server
    db = local.get()
    with db.conn:
        db.execute("delete from knowledge")
    fill(db, size, pairs, rng)
    index = knowledge.KnowledgeIndex(local.get)
    index.references(pairs[0][0], 3, 0.0)  # loads MiniLM and the matrix
    rows, matrix = index._worker.submit(index._current).result()
    assert len(rows) == size, (len(rows), size)

    probe = rng.standard_normal((queries, knowledge.DIMENSIONS)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    search = []
    for query in probe:
        start = time.perf_counter()
        knowledge._nearest(rows, matrix, query, 3, 0.0)
        search.append(time.perf_counter() - start)

    asked = []
    for i in range(queries):
        question = pairs[(i * 7) % len(pairs)][0]
        start = time.perf_counter()
        index.references(question, 3, 0.4)
        asked.append(time.perf_counter() - start)

    reload = []
    for i, thing in enumerate(("kayak rental", "telescope loan", "violin insurance", "tractor lease", "piano storage")):
        # Words, not numbers: the embedding text masks digits (feedback.dedupe.embedding_text).
        knowledge.add(db, f"What is the fee for {thing}?", f"The {thing} fee is ${i + 3}.", None)
        start = time.perf_counter()
        found = index.references(f"What is the fee for {thing}?", 1, 0.0)
        reload.append(time.perf_counter() - start)
        assert found and found[0].answer == f"The {thing} fee is ${i + 3}.", found
    return {"size": size, "matrix_mb": round(matrix.nbytes / 2**20, 1),
            "search": percentiles(search), "question": percentiles(asked),
            "reload_max_s": round(max(reload), 3), "reload_median_s": round(float(np.median(reload)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(not 1 <= size <= 1_000_000 for size in args.sizes) or not 1 <= args.queries <= 100_000:
        parser.error("sizes must be between 1 and 1000000, queries between 1 and 100000")

    with tempfile.TemporaryDirectory(prefix="tuneloop-knowledge-") as home:
        os.environ["TUNELOOP_HOME"] = home
        from assistant import paths

        paths.configure_environment()
        rows = [json.loads(line) for line in PACK_QA.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [(row["question"], row["answer"]) for row in rows]
        rng = np.random.default_rng(args.seed)
        print(f"knowledge index, exact search (numpy), k=3; {args.queries} queries per size; {os.cpu_count()} CPU cores")
        print("| entries | matrix | search alone | customer question (embed + search) | correction searchable after (median / max of 5) |")
        print("| --- | --- | --- | --- | --- |")
        for size in args.sizes:
            result = measure(size, args.queries, pairs, rng)
            print(f"| {result['size']:,} | {result['matrix_mb']} MB | {result['search']} | {result['question']} "
                  f"| {result['reload_median_s']} s / {result['reload_max_s']} s |", flush=True)


if __name__ == "__main__":
    main()
