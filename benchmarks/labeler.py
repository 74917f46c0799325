"""Answer labeler on Bitext: does it recover the intent from the reference answers?

Usage: ``python benchmarks/labeler.py [--data DIR]``. Reads ``bitext/bitext_customer_support.csv``
under the shared data folder (``$TUNELOOP_SHARED_DATA``, default ``../shared/data`` beside the
repo), fits ``evals.labeler.AnswerLabeler`` on a stratified 80% of rows (seed 0) and reports
macro-F1 on the other 20%. The product bar is macro-F1 >= 0.95: below it, label F1 of generated
answers would measure the labeler more than the adapter.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from evals.labeler import AnswerLabeler, prepare_text  # noqa: E402
from evals.metrics import label_scores  # noqa: E402
from assistant.embeddings import load_embedder  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
BAR = 0.95


def bitext_split(path: Path | str, test_size: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Bitext rows split into train and test, stratified by intent."""
    from sklearn.model_selection import train_test_split

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return train_test_split(rows, test_size=test_size, stratify=[r["intent"] for r in rows], random_state=seed)


def main(data_dir: Path = DEFAULT_DATA) -> dict[str, float]:
    """Fit on 80% of Bitext answers, print and return macro-F1 on the rest, n and seconds."""
    path = Path(data_dir) / "bitext" / "bitext_customer_support.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: point --data or TUNELOOP_SHARED_DATA at the shared data folder")
    start = time.perf_counter()
    train, test = bitext_split(path)
    labeler = AnswerLabeler().fit([r["response"] for r in train], [r["intent"] for r in train])
    scores = label_scores([r["intent"] for r in test], labeler.predict([r["response"] for r in test]))
    seconds = time.perf_counter() - start

    # Answers are long (median ~112 words); MiniLM reads the first 256 word pieces of each.
    embedder = load_embedder()
    lengths = [len(embedder.tokenizer(prepare_text(r["response"]), verbose=False)["input_ids"]) for r in train + test]
    truncated = sum(n > embedder.max_seq_length for n in lengths) / len(lengths)
    print(f"bitext answer labeler: MiniLM + LogisticRegression(C={labeler.c}, class_weight=balanced)")
    print(
        f"train {len(train)} answers, test {len(test)} answers, {len(scores['per_label'])} intents "
        f"(stratified 80/20, seed 0); {truncated:.1%} of answers cut at {embedder.max_seq_length} tokens"
    )
    print(f"macro-F1 {scores['f1']:.4f}  accuracy {scores['accuracy']:.4f}  n {scores['n']}  seconds {seconds:.1f}")
    print("top confusions: " + ", ".join(f"{c['true']}->{c['predicted']} x{c['count']}" for c in scores["confusions"][:5]))
    print(f"bar macro-F1 >= {BAR}: {'PASS' if scores['f1'] >= BAR else 'FAIL'}")
    return {"macro_f1": scores["f1"], "accuracy": scores["accuracy"], "n": scores["n"], "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder holding bitext/")
    main(parser.parse_args().data)
