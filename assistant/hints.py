"""Topic hints: the products a customer's question is most likely about, told to the model.

A question classifier (:class:`assistant.classifier.EmbeddingClassifier`, MiniLM embeddings and a
logistic regression) is fitted on the training questions and their labels when an adapter is
trained, and saved inside the adapter folder (``hints/``). Serving and evaluation put its ``k``
most likely labels, as words, at the end of the system message of every prompt that adapter
answers::

    ...persona...

    Topics that may fit the customer's latest question: online mobile banking, peach pay, peach savings.

The labels are listed alphabetically, not most likely first: listed by rank, the model learnt to
copy the first one (it did for 106 of 115 test questions) and scored like the classifier alone.
Training hints are cross-fitted (each training question's hint comes from a classifier that did
not see it), so they are as often wrong in training as in service. The idea was that the two err
on different questions; measured on the shipped pack, the model with hints did not score higher
than without (``TrainConfig.hints`` is off by default; figures in docs/results.md).

The hint goes in the system turn, which customers cannot write: a customer typing "Topics that may
fit..." only adds words to their own question. The hint belongs to the adapter: rolling back
restores the classifier the older adapter was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from assistant.classifier import EmbeddingClassifier

HINTS_DIR = "hints"
"""Folder inside an adapter that holds its question classifier and ``hints.json``."""
SETTINGS_FILE = "hints.json"


def hint_text(labels: Sequence[str]) -> str:
    """The sentence the model reads: the labels as words, in alphabetical order."""
    names = ", ".join(sorted(str(label).replace("_", " ") for label in labels))
    return f"Topics that may fit the customer's latest question: {names}."


def with_hint(messages: list[dict], hint: str) -> list[dict]:
    """``messages`` with ``hint`` appended to the system message (a copy; empty hint: unchanged)."""
    if not hint:
        return messages
    if not messages or messages[0].get("role") != "system":
        raise ValueError("a topic hint goes in the system message, and these messages have none")
    return [{**messages[0], "content": f"{messages[0]['content']}\n\n{hint}"}, *messages[1:]]


class TopicHints:
    """A question classifier and how many of its labels each prompt gets."""

    def __init__(self, classifier: EmbeddingClassifier, k: int):
        if k < 1:
            raise ValueError("topic hints need k >= 1 labels per question")
        self.classifier = classifier
        self.k = k

    @classmethod
    def fit(cls, questions: Sequence[str], labels: Sequence[str], k: int) -> TopicHints:
        """Fit the question classifier on labelled questions."""
        return cls(EmbeddingClassifier().fit(list(questions), [str(label) for label in labels]), k)

    def hints(self, questions: Sequence[str]) -> list[str]:
        """The hint sentence of each question."""
        if not questions:
            return []
        return [hint_text(labels) for labels in self.classifier.top_labels(list(questions), self.k)]

    def apply(self, conversations: list[list[dict]]) -> list[list[dict]]:
        """Each conversation with the hint for its last (customer) message in its system message."""
        hints = self.hints([messages[-1]["content"] for messages in conversations])
        return [with_hint(messages, hint) for messages, hint in zip(conversations, hints)]

    def longest_hint(self) -> str:
        """The hint of the ``k`` longest label names (in characters, a stand-in for tokens): the
        prompt budget reserves room for it."""
        names = sorted(self.classifier.classes, key=lambda label: len(label), reverse=True)
        return hint_text(names[: self.k])

    def save(self, adapter_folder: Path) -> Path:
        """Write the classifier and ``k`` into ``<adapter_folder>/hints/``."""
        folder = Path(adapter_folder) / HINTS_DIR
        self.classifier.save(folder)
        (folder / SETTINGS_FILE).write_text(json.dumps({"k": self.k}) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, adapter_folder: Path) -> TopicHints | None:
        """The adapter's hints, or None when it was trained without them; ValueError when damaged."""
        folder = Path(adapter_folder) / HINTS_DIR
        if not folder.exists():
            return None
        try:
            k = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))["k"]
            return cls(EmbeddingClassifier.load(folder), int(k))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the topic hints in {folder} are missing or damaged ({exc})") from exc
