"""Curation time and memory on 10k and 50k feedback rows, cold and on the warm embedding cache.

Feedback is synthesised from the shared Bitext questions into a temporary home's SQLite: each
row is a logged turn (question = a Bitext question with one of 12 openings and 12 closings, so
rows are distinct texts that still share wording; answer = the first 200 characters of the Bitext
response, truncated to keep the database small) with a vote: 60 % thumbs-up, 25 % thumbs-down,
5 % flagged thumbs-up, 10 % corrected by staff. The cold run embeds every distinct question
(model load included); the warm run repeats the curation on the same data and embeds nothing.
Last, the paraphrase clustering an import runs (``dedupe.components``) over every cached embedding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curate.py [--sizes 10000 50000]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BITEXT = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data")) / "bitext" / "bitext_customer_support.csv"
OPENINGS = ["", "hi, ", "hello ", "hey there, ", "good morning, ", "quick question: ", "please help, ", "excuse me, ",
            "sorry to bother you, ", "hi team, ", "urgent: ", "one more thing, "]
CLOSINGS = ["", " thanks", " thank you!", " please", " asap", " cheers", " thx", " regards",
            " many thanks", " appreciate it", " any idea?", " help!"]


def build_feedback(db, size: int, seed: int = 0) -> None:
    """Write ``size`` turns with votes and corrections built from Bitext questions."""
    import csv

    with open(BITEXT, encoding="utf-8", newline="") as handle:
        source = [(r["instruction"], r["response"][:200]) for r in csv.DictReader(handle)]
    rng = random.Random(seed)
    combos = rng.sample(range(len(source) * len(OPENINGS) * len(CLOSINGS)), size)
    at = "2025-01-01T00:00:00+00:00"
    db["staff_users"].insert({"name": "bench", "password_hash": "x", "created_at": at})
    db["sessions"].insert({"id": "bench", "kind": "customer", "created_at": at})
    turns, votes, corrections = [], [], []
    for turn_id, combo in enumerate(combos, start=1):
        q_index, rest = divmod(combo, len(OPENINGS) * len(CLOSINGS))
        question = OPENINGS[rest // len(CLOSINGS)] + source[q_index][0] + CLOSINGS[rest % len(CLOSINGS)]
        created = f"2025-01-{1 + turn_id % 28:02d}T00:00:{turn_id % 60:02d}+00:00"
        turns.append((turn_id, "bench", question, source[q_index][1], "complete", created))
        roll = rng.random()
        if roll < 0.60:
            votes.append((turn_id, "bench", 1, 0, created))
        elif roll < 0.85:
            votes.append((turn_id, "bench", -1, 0, created))
        elif roll < 0.90:
            votes.append((turn_id, "bench", 1, 1, created))
        else:
            votes.append((turn_id, "bench", -1, 0, created))
            corrections.append((turn_id, "correction", question, "Corrected: " + source[q_index][1], "bench", created))
    with db.conn:
        db.conn.executemany("insert into turns (id, session_id, question, answer, status, created_at) values (?, ?, ?, ?, ?, ?)", turns)
        db.conn.executemany("insert into votes (turn_id, session_id, value, flagged, created_at) values (?, ?, ?, ?, ?)", votes)
        db.conn.executemany("insert into corrections (turn_id, kind, question, answer, staff_user, created_at) values (?, ?, ?, ?, ?, ?)", corrections)


def measure(label: str, cfg) -> tuple[float, object]:
    from feedback import curate

    tracemalloc.start()
    started = time.perf_counter()
    result = curate.main(cfg)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  {label:<5} {seconds:8.1f} s   peak traced {peak / 2**20:7.1f} MiB   version {result.version}"
          f"{' (unchanged)' if result.unchanged else ''}   counts {result.counts}   dropped {result.dropped}", flush=True)
    return seconds, result


def measure_clusters(db) -> None:
    """Paraphrase clusters over every cached embedding: what an import of these questions runs to
    keep paraphrases in one split (curation itself collapses greedily and never clusters)."""
    import numpy as np

    from feedback import dedupe

    vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for (blob,) in db.execute("select vector from embeddings")])
    tracemalloc.start()
    started = time.perf_counter()
    labels = dedupe.components(vectors, dedupe.NEAR_DUPLICATE_THRESHOLD)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  clusters {seconds:5.1f} s   peak traced {peak / 2**20:7.1f} MiB   {len(np.unique(labels))} clusters "
          f"of {len(vectors)} questions", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="feedback rows per run")
    args = parser.parse_args(argv)
    if not BITEXT.exists():
        print(f"Bitext not found at {BITEXT}; set TUNELOOP_SHARED_DATA", file=sys.stderr)
        return 2
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as home:
            os.environ["TUNELOOP_HOME"] = home
            from feedback import curate
            from feedback.db import connect

            db = connect()
            build_feedback(db, size)
            print(f"{size} feedback rows (Bitext questions, answers truncated to 200 chars), {os.cpu_count()} CPU cores", flush=True)
            cold, _ = measure("cold", curate.CurateConfig())
            warm, _ = measure("warm", curate.CurateConfig())
            print(f"  warm cache speed-up: {cold / warm:.0f}x; cached embeddings: {db['embeddings'].count}", flush=True)
            measure_clusters(db)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the whole process (model included): {peak_rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
