"""Predict the intent (product) label of an answer text, to score generated answers by label F1.

Method: :class:`assistant.classifier.EmbeddingClassifier` -- all-MiniLM-L6-v2 embeddings and a
balanced logistic regression -- fitted on (reference answer, label) pairs of the training split.

Every answer gets a label: abstaining on low confidence was tried and did not raise macro-F1 (the
figures, from benchmarks/labeler.py, are in docs/results.md).
"""

from __future__ import annotations

from assistant.classifier import EmbeddingClassifier, prepare_text

AnswerLabeler = EmbeddingClassifier
"""The answer labeler is the embedding classifier fitted on answers (``evals.evaluate.labeler_for``)."""

__all__ = ["AnswerLabeler", "prepare_text"]
