"""Banking77 reference bar: 800 training questions -> MiniLM embeddings + logistic regression.

Usage: ``python benchmarks/banking77_baseline.py [--data DIR] [--c C ...]``. Reads
``banking77/train.csv`` under the shared data folder (``$TUNELOOP_SHARED_DATA``, default
``../shared/data`` beside the repo), trains ``evals.labeler.AnswerLabeler`` (the same
embedding + classifier the product uses on answers) on a stratified sample of 800 questions and
reports macro-F1 on 20 held-out questions per intent drawn from the remaining rows.

The project's reference figure is macro-F1 of about 0.81. By default the benchmark runs two
regularisation strengths: C=1 (scikit-learn's default) and C=10 (the labeler's default).

``--snapshot DIR`` draws the same bar on a dataset snapshot instead (``train.jsonl`` /
``test.jsonl`` with ``question`` and ``label``, as ``tuneloop init`` writes for the Peach State
Bank pack under ``$TUNELOOP_HOME/datasets``): the classifier the fine-tuned model should beat
while still answering in words, scored on the same held-out questions as
``benchmarks/pack_result.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from evals.labeler import AnswerLabeler  # noqa: E402
from evals.metrics import bootstrap_interval, label_scores, macro_f1  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


def banking77_split(
    path: Path | str, n_train: int = 800, n_test_per_label: int = 20, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stratified ``n_train`` training rows, then ``n_test_per_label`` test rows per intent from the rest.

    Rows are ``{"text", "category"}`` dicts from Banking77's ``train.csv``; the two lists never share
    a row, and the same seed always gives the same split.
    """
    from sklearn.model_selection import train_test_split

    with open(path, newline="", encoding="utf-8") as handle:
        rows = [{"text": r["text"], "category": r["category"]} for r in csv.DictReader(handle)]
    train, rest = train_test_split(
        rows, train_size=n_train, stratify=[r["category"] for r in rows], random_state=seed
    )
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rest:
        by_label.setdefault(row["category"], []).append(row)
    test = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < n_test_per_label:
            raise ValueError(f"{label} has {len(pool)} rows left after training, fewer than n_test_per_label={n_test_per_label}")
        test.extend(pool[i] for i in sorted(rng.choice(len(pool), n_test_per_label, replace=False)))
    return train, test


def main(data_dir: Path = DEFAULT_DATA, c: float = 10.0) -> dict[str, float]:
    """Fit on the 800-question split, print and return macro-F1, accuracy, n and seconds."""
    path = Path(data_dir) / "banking77" / "train.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: point --data or TUNELOOP_SHARED_DATA at the shared data folder")
    start = time.perf_counter()
    train, test = banking77_split(path)
    return score_bar(
        [(r["text"], r["category"]) for r in train], [(r["text"], r["category"]) for r in test], c, start,
        f"banking77 baseline: MiniLM + LogisticRegression(C={c}, class_weight=balanced)",
        f"train {len(train)} questions (stratified, seed 0), test {len(test)} ({{labels}} intents x 20)",
    )


def snapshot_bar(folder: Path, c: float = 10.0) -> dict[str, float]:
    """Fit on a snapshot's training questions, score its test questions; print and return the figures."""
    splits = {}
    for split in ("train", "test"):
        path = Path(folder) / f"{split}.jsonl"
        if not path.exists():
            raise SystemExit(f"{path} not found: --snapshot takes a dataset folder with train.jsonl and test.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = [(r["question"], r["label"]) for r in rows if r.get("label")]
    return score_bar(
        splits["train"], splits["test"], c, time.perf_counter(),
        f"{folder}: MiniLM + LogisticRegression(C={c}, class_weight=balanced) on the questions",
        f"train {len(splits['train'])} questions, test {len(splits['test'])} ({{labels}} labels)",
    )


def question_classifier(train: list[tuple[str, str]], questions: list[str], c: float) -> list[str]:
    """The bar's predictions: the labeler fitted on (question, label) pairs, labelling ``questions``."""
    return AnswerLabeler(c=c).fit([q for q, _ in train], [label for _, label in train]).predict(questions)


def score_bar(train: list[tuple[str, str]], test: list[tuple[str, str]], c: float, start: float,
              title: str, sizes: str) -> dict[str, float]:
    """Fit the labeler on (question, label) pairs, score the test pairs, print and return the figures."""
    # The labeler embeds inside fit/predict, so seconds include embedding the questions.
    truth, predicted = [label for _, label in test], question_classifier(train, [q for q, _ in test], c)
    scores = label_scores(truth, predicted)
    interval = bootstrap_interval(macro_f1, truth, predicted)
    seconds = time.perf_counter() - start
    print(title)
    print(sizes.format(labels=len(scores["per_label"])))
    print(f"macro-F1 {scores['f1']:.4f} (95% CI {interval['ci_low']:.3f}-{interval['ci_high']:.3f})  "
          f"accuracy {scores['accuracy']:.4f}  n {scores['n']}  seconds {seconds:.1f}")
    return {"macro_f1": scores["f1"], "macro_f1_ci": [interval["ci_low"], interval["ci_high"]],
            "accuracy": scores["accuracy"], "n": scores["n"], "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder holding banking77/")
    parser.add_argument(
        "--c", type=float, nargs="+", default=[1.0, 10.0], help="inverse regularisation strength(s) of the classifier"
    )
    parser.add_argument("--snapshot", type=Path, help="a dataset snapshot folder to draw the bar on instead of Banking77")
    args = parser.parse_args()
    for c in args.c:
        if args.snapshot:
            snapshot_bar(args.snapshot, c)
        else:
            main(args.data, c)
