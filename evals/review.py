"""Blind side-by-side human review of the current and candidate adapters.

The retrain job already generated both adapters' answers to every test question; a review batch
samples some of them and stores each pair with the two answers placed left or right at random, so a
reviewer cannot tell which adapter wrote which. Staff mark each answer "accurate and helpful" or not
in the staff view; the report shows the share per adapter. The review tables are
:mod:`feedback.review`'s (the app writes the marks), so this module only picks the pairs.
"""

from __future__ import annotations

import random

import sqlite_utils

from evals.evaluate import EvalReport
from feedback import review


def create_batch(
    db: sqlite_utils.Database, candidate: EvalReport, incumbent: EvalReport, n: int, seed: int = 0, batch: str | None = None
) -> str:
    """Store ``n`` randomly chosen questions with the two reports' answers in random order; returns the batch name."""
    if [r["id"] for r in candidate.examples] != [r["id"] for r in incumbent.examples]:
        raise ValueError("the two reports cover different test examples")
    rng = random.Random(seed)
    indices = sorted(rng.sample(range(candidate.n), min(n, candidate.n)))
    batch = batch or f"{candidate.adapter}-vs-{incumbent.adapter or 'base'}"
    pairs = []
    for index in indices:
        sides = [(candidate.adapter, candidate.examples[index]["answer"]),
                 (incumbent.adapter, incumbent.examples[index]["answer"])]
        rng.shuffle(sides)
        pairs.append(review.ReviewPair(
            question=candidate.examples[index]["question"],
            reference=candidate.examples[index]["reference"],
            left_adapter=sides[0][0],
            left_answer=sides[0][1],
            right_adapter=sides[1][0],
            right_answer=sides[1][1],
        ))
    review.add_review_pairs(db, batch, pairs)
    return batch
