"""Paraphrase clusters (``dedupe.components``): scipy's connected components over blockwise
similarities give exactly the labels the Python union-find gave, chains included, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from feedback import dedupe

THRESHOLD = dedupe.NEAR_DUPLICATE_THRESHOLD


def union_find_components(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The previous implementation, kept as the reference: a union-find over every pair above the
    threshold, each component labelled by its smallest row."""
    n = len(vectors)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 512):
        sims = vectors[start : start + 512] @ vectors[start:].T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = find(start + r), find(start + c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def chain(rng: np.random.Generator, dim: int, length: int) -> np.ndarray:
    """Unit rows along an arc in a random plane: neighbours are above the threshold, rows two apart
    well below it, so the chain is one component only through its links."""
    plane = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    step = 0.95 * np.arccos(THRESHOLD)  # cos(step) ~ 0.91, cos(2 * step) ~ 0.66
    angles = np.arange(length) * step
    return np.cos(angles)[:, None] * plane[0] + np.sin(angles)[:, None] * plane[1]


def mixed_vectors(seed: int, dim: int = 384) -> np.ndarray:
    """Long and short chains, tight clusters, exact duplicates and singletons, shuffled."""
    rng = np.random.default_rng(seed)
    parts = [chain(rng, dim, length) for length in (700, 40, 5, 2)]
    for size in rng.integers(1, 12, size=25):
        center = rng.standard_normal(dim)
        parts.append(center + 0.1 * rng.standard_normal((size, dim)))
    singles = rng.standard_normal((800, dim))
    parts += [singles, singles[:30]]  # exact duplicates of some singletons
    rows = np.concatenate(parts)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows[rng.permutation(len(rows))].astype(np.float32)


@pytest.mark.parametrize("block", [7, 512, 2048])
@pytest.mark.parametrize("seed", [0, 1])
def test_components_equal_the_union_find_labels(seed, block, monkeypatch):
    monkeypatch.setattr(dedupe, "_BLOCK", block)
    vectors = mixed_vectors(seed)
    expected = union_find_components(vectors, THRESHOLD)
    labels = dedupe.components(vectors, THRESHOLD)
    assert labels.dtype == np.int64 and np.array_equal(labels, expected)
    # The data does test chaining: the 700-row chain is one component whose ends are far apart.
    sizes = np.bincount(labels)
    biggest = np.nonzero(labels == sizes.argmax())[0]
    assert len(biggest) == 700
    sims = vectors[biggest] @ vectors[biggest].T
    assert sims.min() < 0


def test_components_of_nothing_one_row_and_identical_rows():
    assert dedupe.components(np.zeros((0, 384), np.float32), THRESHOLD).tolist() == []
    one = np.eye(1, 384, dtype=np.float32)
    assert dedupe.components(one, THRESHOLD).tolist() == [0]
    same = np.repeat(one, 3, axis=0)
    assert dedupe.components(np.concatenate([np.eye(2, 384, k=5, dtype=np.float32), same]), THRESHOLD).tolist() \
        == [0, 1, 2, 2, 2]


@pytest.mark.parametrize("repeated", [0, 6_000])
def test_components_memory_is_bounded_by_the_block_not_the_pairs(repeated):
    """12,000 rows, half of them one repeated question or none: the full similarity matrix would be
    550 MiB, and listing the 18 million pairs of the repeated question 275 MiB at 16 bytes a pair."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12_000, 32)).astype(np.float32)
    vectors[:repeated] = vectors[0]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors[rng.permutation(len(vectors))]
    tracemalloc.start()
    try:
        labels = dedupe.components(vectors, THRESHOLD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(np.unique(labels)) == len(vectors) - max(repeated - 1, 0)
    block_bytes = dedupe._BLOCK * len(vectors) * 4  # one block's similarities
    assert peak < 6 * block_bytes, f"peak {peak / 2**20:.0f} MiB"
