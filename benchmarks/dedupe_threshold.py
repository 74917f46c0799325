"""Choose the near-duplicate threshold on real paraphrases: precision and recall over thresholds.

Pairs come from the shared Bitext customer-support questions (``../shared/data/bitext``):

* duplicate: same intent, and the questions are one template with different entity fillers
  (the entity span, located from the row's entity columns, masked as ``{x}``), or their masked
  templates differ by exactly one word (typo or synonym swap);
* non-duplicate, three kinds in equal numbers: same intent but worded differently (word Jaccard of
  the masked templates < 0.3); random pairs of different intents; hard pairs of different intents
  that share most words (word Jaccard >= 0.5).

Pairs in between (same intent, Jaccard 0.3 and above, more than one word changed) are left out:
whether they are "the same question" is a judgement call, not ground truth.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dedupe_threshold.py [--pairs 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BITEXT = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data")) / "bitext" / "bitext_customer_support.csv"
THRESHOLDS = [0.60, 0.65, 0.70, 0.75, 0.78, 0.80, 0.82, 0.85, 0.88, 0.90, 0.93, 0.95]


def masked_template(row: dict) -> str:
    """The question with its entity value replaced by ``{x}``, lower-cased, whitespace collapsed."""
    text = row["instruction"]
    value = row["entity_value"]
    if row["entity_type"] and value:
        start, end = int(row["start_offset"]), int(row["end_offset"])
        if text[start:end] != value:  # offsets are off in some rows (leading zeros); find the value
            start = text.find(value)
            end = start + len(value)
        if start >= 0:
            text = text[:start] + "{x}" + text[end:]
    return " ".join(text.lower().split())


def word_edit_distance_is_one(a: list[str], b: list[str]) -> bool:
    """True when ``b`` is ``a`` with exactly one word substituted, inserted or deleted."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def build_pairs(rows: list[dict], per_kind: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Duplicate and non-duplicate index pairs (see the module docstring)."""
    rng = random.Random(seed)
    templates = [masked_template(r) for r in rows]
    words = [t.split() for t in templates]
    sets = [set(w) for w in words]
    by_intent: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_intent.setdefault(r["intent"], []).append(i)

    duplicates, same_intent_different = [], []
    for members in by_intent.values():
        for i, j in itertools.combinations(members, 2):
            if rows[i]["instruction"].strip().lower() == rows[j]["instruction"].strip().lower():
                continue
            if templates[i] == templates[j] or word_edit_distance_is_one(words[i], words[j]):
                duplicates.append((i, j))
            elif jaccard(sets[i], sets[j]) < 0.3:
                same_intent_different.append((i, j))

    intents = list(by_intent)
    random_cross = set()
    while len(random_cross) < per_kind:
        a, b = rng.sample(intents, 2)
        random_cross.add((rng.choice(by_intent[a]), rng.choice(by_intent[b])))
    hard_cross = []
    for a, b in itertools.combinations(intents, 2):
        for i in by_intent[a]:
            for j in by_intent[b]:
                if jaccard(sets[i], sets[j]) >= 0.5:
                    hard_cross.append((i, j))

    def sample(pairs: list, k: int) -> list:
        return rng.sample(sorted(pairs), min(k, len(pairs)))

    positives = sample(duplicates, per_kind)
    negatives = sample(same_intent_different, per_kind) + sorted(random_cross) + sample(hard_cross, per_kind)
    return positives, negatives


def sweep(sims_pos: np.ndarray, sims_neg: np.ndarray, thresholds: list[float]) -> list[dict]:
    """Precision, recall and F1 of "similarity >= t means duplicate" for each threshold."""
    table = []
    for t in thresholds:
        tp = int((sims_pos >= t).sum())
        fp = int((sims_neg >= t).sum())
        fn = len(sims_pos) - tp
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table.append({"threshold": t, "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn})
    return table


def load_rows(path: Path = BITEXT) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def pair_similarities(rows: list[dict], positives, negatives) -> tuple[np.ndarray, np.ndarray]:
    from feedback import dedupe
    from feedback.db import connect

    used = sorted({i for pair in positives + negatives for i in pair})
    # The cache in $TUNELOOP_HOME makes a rerun (another --seed) cost seconds, not a minute.
    vectors = dedupe.EmbeddingCache(connect()).vectors([rows[i]["instruction"] for i in used])
    index = {i: k for k, i in enumerate(used)}

    def sims(pairs):
        return np.array([float(vectors[index[i]] @ vectors[index[j]]) for i, j in pairs])

    return sims(positives), sims(negatives)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1500, help="pairs of each kind (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not BITEXT.exists():
        print(f"Bitext not found at {BITEXT}; set TUNELOOP_SHARED_DATA", file=sys.stderr)
        return 2
    from feedback import dedupe

    rows = load_rows()
    positives, negatives = build_pairs(rows, args.pairs, args.seed)
    started = time.perf_counter()
    sims_pos, sims_neg = pair_similarities(rows, positives, negatives)
    print(f"{len(positives)} duplicate pairs, {len(negatives)} non-duplicate pairs "
          f"(same intent reworded, random cross-intent, hard cross-intent: {args.pairs} each at most); "
          f"embedded in {time.perf_counter() - started:.1f} s")
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'f1':>6} {'tp':>5} {'fp':>5} {'fn':>5}")
    for row in sweep(sims_pos, sims_neg, THRESHOLDS):
        mark = "  <- chosen" if abs(row["threshold"] - dedupe.NEAR_DUPLICATE_THRESHOLD) < 1e-9 else ""
        print(f"{row['threshold']:>9.2f} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} "
              f"{row['tp']:>5} {row['fp']:>5} {row['fn']:>5}{mark}")
    print(f"chosen threshold: {dedupe.NEAR_DUPLICATE_THRESHOLD} (feedback/dedupe.py NEAR_DUPLICATE_THRESHOLD)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
