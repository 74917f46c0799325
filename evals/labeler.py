"""Predict the intent (product) label of an answer text, to score generated answers by label F1.

Method: :class:`assistant.classifier.EmbeddingClassifier` -- all-MiniLM-L6-v2 embeddings and a
balanced logistic regression -- fitted on (reference answer, label) pairs of the training split.

Measured (``benchmarks/labeler.py``): macro-F1 0.99 on held-out Bitext reference answers (27
intents, 80/20 stratified split). Abstaining on low confidence was tried and did not raise macro-F1,
even on answers cut to their first 40 words, so every answer gets a label.
"""

from __future__ import annotations

from assistant.classifier import EmbeddingClassifier, prepare_text

AnswerLabeler = EmbeddingClassifier
"""The answer labeler is the embedding classifier fitted on answers (``evals.evaluate.labeler_for``)."""

__all__ = ["AnswerLabeler", "prepare_text"]
