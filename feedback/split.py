"""Train/val/test assignment of imported examples: decided once, at import, and stored.

Rules, in order, for each cluster of new questions (connected components of "cosine similarity
>= threshold", so paraphrases travel together):

1. near-duplicate of an existing test question: joins test when the import may add to the test set
   (``allow_test``), otherwise it is held out (not imported, counted) so it can neither straddle
   train and test nor grow the frozen test set by stealth;
2. near-duplicate of an existing train or val question: joins the split of the closest one;
3. otherwise a stable hash of the cluster's content picks the split: train/val/test by the
   configured fractions while no test set exists yet (the first import) or with ``allow_test``;
   train/val in the same proportion once a test set exists.

Curation still drops any training candidate near a test question (decontamination), so a chain
of paraphrases reaching test through a new import cannot leak into a snapshot either.
"""

from __future__ import annotations

import hashlib

import numpy as np

from feedback import dedupe

SPLITS = ("train", "val", "test")


def unit_interval(key: str) -> float:
    """A stable number in [0, 1) from a string (the same on every machine and run)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:13], 16) / 16**13


def split_for_key(key: str, val_fraction: float, test_fraction: float, allow_test: bool) -> str:
    """The split a new cluster gets from its content hash alone."""
    u = unit_interval(key)
    if allow_test:
        return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    # Without test, train and val keep their configured proportion (80:10 -> 8/9 : 1/9).
    return "val" if u < val_fraction / (1.0 - test_fraction) else "train"


def assign(
    new_vectors: np.ndarray,
    new_keys: list[str],
    existing_vectors: np.ndarray,
    existing_splits: list[str],
    threshold: float,
    val_fraction: float,
    test_fraction: float,
    allow_test: bool,
) -> list[str | None]:
    """The split of each new example, or None when it is held out (near a frozen test question)."""
    labels = dedupe.components(new_vectors, threshold)
    existing = np.asarray(existing_splits, dtype=object).reshape(-1)
    is_test = existing == "test"
    test_sim, _ = dedupe.nearest(new_vectors, existing_vectors[is_test])
    rest_sim, rest_idx = dedupe.nearest(new_vectors, existing_vectors[~is_test])
    rest_splits = existing[~is_test]
    test_exists = bool(is_test.any())

    result: list[str | None] = [None] * len(new_keys)
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        if (test_sim[members] >= threshold).any():
            split = "test" if allow_test else None
        elif (rest_sim[members] >= threshold).any():
            closest = members[rest_sim[members].argmax()]
            split = str(rest_splits[rest_idx[closest]])
        else:
            key = min(new_keys[m] for m in members)
            split = split_for_key(key, val_fraction, test_fraction, allow_test or not test_exists)
        for m in members:
            result[m] = split
    return result
