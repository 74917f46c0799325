"""Choose ``retrieval_min_score``: how often the right label is among the references a threshold lets
through, against how often unrelated text gets any.

For each question of a query set, its nearest questions in a training pool by MiniLM cosine (the
knowledge index's search); per threshold: the share of queries with any reference, the label
precision of the top reference, and the share whose right label is among the top ``k`` references
at or above the threshold (what a model trained to pick the good reference can use). Unrelated
text: the pack's general passages against the pack's pool.

* pack: ``assistant/packs/peach_state_bank/qa.jsonl`` shuffled, 80% pool, 20% queries;
* Banking77 (``../shared/data/banking77/train.csv``): 11 questions per intent as the pool, 10
  others per intent as queries.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retrieval_threshold.py [--k 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
PACK = REPO / "assistant" / "packs" / "peach_state_bank"
FACTS = REPO / "benchmarks" / "data" / "new_facts.jsonl"
THRESHOLDS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def vectors(texts: list[str]) -> np.ndarray:
    from assistant import embeddings
    from feedback import dedupe

    return embeddings.embed([dedupe.embedding_text(t) for t in texts])


def table(name: str, pool: list[tuple[str, str]], queries: list[tuple[str, str]], k: int) -> np.ndarray:
    pool_vectors = vectors([q for q, _ in pool])
    sims = vectors([q for q, _ in queries]) @ pool_vectors.T
    order = np.argsort(-sims, axis=1)[:, :k]
    best = sims[np.arange(len(queries)), order[:, 0]]
    top1_right = np.array([pool[order[i, 0]][1] == label for i, (_, label) in enumerate(queries)])
    print(f"\n{name}: pool {len(pool)}, queries {len(queries)}")
    print(f"| threshold | queries with a reference | top-1 label precision | right label in top {k} above it |")
    print("| --- | --- | --- | --- |")
    for threshold in THRESHOLDS:
        has = best >= threshold
        right = np.mean([any(pool[j][1] == label and sims[i, j] >= threshold for j in order[i])
                         for i, (_, label) in enumerate(queries)])
        precision = f"{top1_right[has].mean():.3f}" if has.any() else "-"
        print(f"| {threshold:.2f} | {has.mean():.3f} | {precision} | {right:.3f} |")
    return pool_vectors


MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2)


def staff_margin_table(pool: list[tuple[str, str]], pool_vectors: np.ndarray, queries: list[tuple[str, str]],
                       facts: list[dict], asked: list[tuple[str, int]], k: int) -> None:
    """``[serve] staff_margin``: with the new facts' corrections in the index beside the pack's pool,
    ordered as serving orders them (``assistant.chat.staff_first``), how often a paraphrase gets its
    correction first and in the top ``k``, against how often a pack question gets a correction first
    and keeps its right label in the top ``k``."""
    from dataclasses import dataclass

    from assistant.chat import staff_first
    from assistant.config import ServeConfig

    @dataclass
    class Entry:
        id: int
        label: str | None
        source: str
        score: float

    from feedback.knowledge import scores

    entries = [(label, "dataset") for _, label in pool] + [(None, "added")] * len(facts)
    matrix = np.vstack([pool_vectors, vectors([f["question"] for f in facts])])
    answered = np.arange(len(pool), len(pool) + len(facts))
    answer_matrix = vectors([f["answer"] for f in facts])
    min_score = ServeConfig().retrieval_min_score

    def found(query_vectors: np.ndarray, margin: float, by_answer: bool) -> list[list[Entry]]:
        ranked = []
        for query in query_vectors:
            sims = scores(matrix, answered, answer_matrix, query)[0] if by_answer else matrix @ query
            best = [int(j) for j in np.argsort(-sims)[: 2 * k] if sims[j] >= min_score]
            refs = [Entry(j, entries[j][0], entries[j][1], float(sims[j])) for j in best]
            ranked.append(staff_first(refs, margin)[:k])
        return ranked

    asked_vectors, query_vectors = vectors([p for p, _ in asked]), vectors([q for q, _ in queries])
    print(f"\nstaff_margin: {len(facts)} corrections beside the pack pool of {len(pool)}; {len(asked)} paraphrases, "
          f"{len(queries)} pack queries (similarity >= {min_score}, top {k}); a correction found by its question "
          "only, or by its question or answer (as served, feedback.knowledge.scores)")
    print(f"| found by | margin | paraphrase: its correction first | in top {k} | pack query: a correction first | right label in top {k} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for by_answer, margin in [(b, m) for b in (False, True) for m in MARGINS]:
        paraphrased = found(asked_vectors, margin, by_answer)
        own = [len(pool) + i for _, i in asked]
        first = np.mean([bool(refs) and refs[0].id == j for refs, j in zip(paraphrased, own)])
        top = np.mean([any(r.id == j for r in refs) for refs, j in zip(paraphrased, own)])
        pack = found(query_vectors, margin, by_answer)
        stolen = np.mean([bool(refs) and refs[0].source == "added" for refs in pack])
        right = np.mean([any(r.label == label for r in refs) for refs, (_, label) in zip(pack, queries)])
        print(f"| {'question or answer' if by_answer else 'question'} | {margin:.2f} | {first:.3f} | {top:.3f} "
              f"| {stolen:.3f} | {right:.3f} |")

    # [serve] staff_verbatim_min_score: a staff pair leading the references (as served) from this
    # similarity is given as it is. Read beside the pool's top-1 label precision above: the share
    # of verbatim answers on the asked topic if every entry were a staff pair.
    margin = ServeConfig().staff_margin
    paraphrased, pack = found(asked_vectors, margin, True), found(query_vectors, margin, True)
    print(f"\nstaff_verbatim_min_score (margin {margin}, found by question or answer)")
    print("| bar | paraphrases answered with their correction | pack queries answered with a correction |")
    print("| --- | --- | --- |")
    for bar in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75):
        own = np.mean([bool(refs) and refs[0].id == len(pool) + i and refs[0].score >= bar
                       for refs, (_, i) in zip(paraphrased, asked)])
        wrong = np.mean([bool(refs) and refs[0].source == "added" and refs[0].score >= bar for refs in pack])
        print(f"| {bar:.2f} | {own:.3f} | {wrong:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="references per question (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    rows = [json.loads(line) for line in (PACK / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [(r["question"], r["label"]) for r in rows]
    rng.shuffle(pairs)
    cut = int(len(pairs) * 0.8)
    pack_vectors = table("pack", pairs[:cut], pairs[cut:], args.k)

    # The verbatim bar ([serve] verbatim_min_score): a staff correction's paraphrases should find it as
    # their best reference above the bar, while the pack's queries above it keep a right top-1 label.
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    own = vectors([f["question"] for f in facts])
    asked = [(p, i) for i, f in enumerate(facts) for p in f["paraphrases"]]
    to_own = vectors([p for p, _ in asked]) @ own.T
    to_pack = (vectors([p for p, _ in asked]) @ pack_vectors.T).max(axis=1)
    best_own = to_own.argmax(axis=1)
    own_score = to_own[np.arange(len(asked)), [i for _, i in asked]]
    found = np.array([best_own[n] == i for n, (_, i) in enumerate(asked)]) & (own_score > to_pack)
    shares = ", ".join(f"{t:.2f}: {(found & (own_score >= t)).mean():.3f}" for t in THRESHOLDS)
    print(f"\ncorrection paraphrases ({len(asked)} of {len(facts)} new facts) whose best reference is their own "
          f"correction, at or above: {shares}")

    staff_margin_table(pairs[:cut], pack_vectors, pairs[cut:], facts, asked, args.k)

    general = [line.strip() for line in (PACK / "general.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    best = (vectors(general) @ pack_vectors.T).max(axis=1)
    shares = ", ".join(f"{t:.2f}: {(best >= t).mean():.3f}" for t in THRESHOLDS)
    print(f"\ngeneral passages ({len(general)}) with any pack reference at or above: {shares}")

    file = SHARED / "banking77" / "train.csv"
    if not file.exists():
        print(f"\n{file} not found; Banking77 skipped")
        return
    by_intent: dict[str, list[str]] = {}
    with open(file, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            by_intent.setdefault(row["category"], []).append(row["text"])
    pool, queries = [], []
    for intent, questions in sorted(by_intent.items()):
        rng.shuffle(questions)
        pool += [(q, intent) for q in questions[:11]]
        queries += [(q, intent) for q in questions[11:21]]
    table("Banking77, 11 per intent", pool, queries, args.k)


if __name__ == "__main__":
    main()
