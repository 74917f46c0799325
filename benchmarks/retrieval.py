"""Grounded answers (issue 24): label F1 of answers given the nearest approved pairs, against the
question-classifier bars, and how often a staff correction reaches a paraphrase before any retrain.

Part 1, one table per data set, every system scored on the same test questions:

* Banking77 (``../shared/data/banking77/train.csv``): 11 training questions per intent (seed 0) and
  ``--test-per-intent`` other questions per intent; a training answer is "This is about <intent>.";
* the pack: the train and test splits ``tuneloop init`` makes of Peach State Bank (115 test questions).

Systems: MiniLM + logistic regression on the questions (``evals.labeler``'s classifier), 1-NN
(the label and answer of the nearest training question), the base model without and with the
references serving gives it (``[serve] retrieval_k`` and ``retrieval_min_score``; a near-certain
match answered with its approved text, as served), and each ``--adapter`` of ``--home`` with the
references it was trained with (none for one trained without). Columns: label F1 and its 95%
bootstrap interval, label F1 minus the 1-NN's with its 95% paired-bootstrap interval, answer F1,
``unsupported_facts``, prompt tokens and seconds per answer. The evaluation is ``tuneloop eval``'s
(``evals.evaluate.evaluate``) on the backend serving picks (llama.cpp on a CPU).

Part 2, corrections before any retrain: each of ``benchmarks/data/new_facts.jsonl``'s 30 made-up
facts (fees, hours, limits the pack does not state) is added as an approved pair for one phrasing
(``tuneloop knowledge add``), then two other phrasings are asked through ``ChatService`` as a customer
would; the share of answers stating the new fact, and how many of those were the approved text itself.

    .venv/bin/python benchmarks/retrieval.py [--test-per-intent 5] [--home DIR --adapter V ...] [--skip banking77]

A Banking77 adapter: ``--write-banking77-snapshot DIR`` writes part 1's training questions (and one
other question per intent for validation) as a dataset snapshot; train on it with ``tuneloop train
--dataset DIR`` and the generic persona (the command is printed), then score it with
``--home H --banking77-adapter V`` and the same ``--test-per-intent``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DATA = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
FACTS = REPO / "benchmarks" / "data" / "new_facts.jsonl"
TRAIN_PER_INTENT = 11


def banking77_sets(per_intent_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """11 training rows per intent and ``per_intent_test`` other rows per intent, as eval rows."""
    with open(DATA / "banking77" / "train.csv", newline="", encoding="utf-8") as handle:
        by_label: dict[str, list[str]] = {}
        for row in csv.DictReader(handle):
            by_label.setdefault(row["category"], []).append(row["text"])
    rng, train, test = random.Random(seed), [], []
    for label in sorted(by_label):
        questions = sorted(set(by_label[label]))
        rng.shuffle(questions)
        for split, chosen in ((train, questions[:TRAIN_PER_INTENT]),
                              (test, questions[TRAIN_PER_INTENT:TRAIN_PER_INTENT + per_intent_test])):
            split.extend({"id": f"b77:{label}:{len(split)}", "question": q, "label": label,
                          "answer": f"This is about {label.replace('_', ' ')}."} for q in chosen)
    return train, test


def write_banking77_snapshot(folder: Path, per_intent_test: int) -> None:
    """The Banking77 sample as a dataset snapshot to train an adapter on (``tuneloop train --dataset``):
    the same 11 training questions per intent as part 1, one other question per intent for
    validation, and part 1's test questions as its test split (never trained on)."""
    train, test = banking77_sets(per_intent_test)
    used = {r["question"] for r in train + test}
    with open(DATA / "banking77" / "train.csv", newline="", encoding="utf-8") as handle:
        by_label: dict[str, list[str]] = {}
        for row in csv.DictReader(handle):
            if row["text"] not in used:
                by_label.setdefault(row["category"], []).append(row["text"])
    rng = random.Random(1)
    val = [{"id": f"b77:{label}:val", "question": rng.choice(sorted(by_label[label])), "label": label,
            "answer": f"This is about {label.replace('_', ' ')}."} for label in sorted(by_label)]
    folder.mkdir(parents=True, exist_ok=False)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({**r, "source": "banking77"}) + "\n" for r in rows),
                                               encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"version": folder.name, "counts": {
        "train": len(train), "val": len(val), "test": len(test)}}), encoding="utf-8")


def setup_pack_home() -> None:
    """As ``tuneloop init --pack peach_state_bank``: persona, catalog, the pack's Q/A, the first snapshot."""
    from feedback import curate, packs
    from feedback.db import connect

    pack = packs.load_pack("peach_state_bank")
    packs.install_persona(pack)
    db = connect()
    packs.import_pack(db, pack)
    curate.main(curate.CurateConfig(), db)


def score_rows(name: str, test, systems: list[tuple[str, str | None, object]], runner, labeler) -> list[dict]:
    """One row per system on ``test``: the classifier bars, then each (label, adapter, serve) model system."""
    from evals import evaluate as evaluation
    from evals import metrics
    from evals.labeler import AnswerLabeler

    truth = [row["label"] for row in test.examples]
    index = test.index()
    knn = index.knn_labels
    nearest = index.references(1, 0.0)
    knn_answers = [refs[0].answer if refs else "" for refs in nearest]
    classifier = AnswerLabeler().fit([r["question"] for r in test.train], [str(r["label"]) for r in test.train])
    rows = [{"system": "MiniLM + logistic regression", "predicted": classifier.predict([r["question"] for r in test.examples])},
            {"system": "1-NN (nearest training question)", "predicted": knn,
             "answer_f1": sum(metrics.answer_f1(a, r["answer"]) for a, r in zip(knn_answers, test.examples)) / len(truth)}]
    for label, adapter, serve in systems:
        started = time.perf_counter()
        report = evaluation.evaluate(runner, test, adapter, serve, labeler)
        print(f"{name}: {label} scored in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append({"system": label, "predicted": [e["predicted_label"] for e in report.examples],
                     "answer_f1": report.answer_f1, "unsupported_facts": report.unsupported_facts,
                     "prompt_tokens": report.prompt_tokens, "latency_s": report.latency_s,
                     "retrieval": report.retrieval, "verbatim": verbatim_answers(index, report.retrieval, serve)})
    for row in rows:
        predicted = row.pop("predicted")
        row["label_f1"] = metrics.macro_f1(truth, predicted)
        interval = metrics.bootstrap_interval(metrics.macro_f1, truth, predicted)
        row["label_f1_ci"] = [round(interval["ci_low"], 3), round(interval["ci_high"], 3)]
        gain = metrics.bootstrap_gain(metrics.macro_f1, truth, knn, predicted)
        row["vs_1nn"] = {"delta": round(gain["delta"], 3), "ci": [round(gain["ci_low"], 3), round(gain["ci_high"], 3)]}
    return rows


def verbatim_answers(index, retrieval: dict | None, serve) -> int:
    """How many test questions were answered with an approved text itself (a near-certain match)."""
    from assistant.chat import answer_from_reference

    if not retrieval:
        return 0
    return sum(answer_from_reference(refs, serve) is not None for refs in index.references(retrieval["k"], retrieval["min_score"]))


def print_table(name: str, n: int, rows: list[dict]) -> None:
    print(f"\n{name} ({n} test questions)")
    print(f"{'system':<44} {'label F1':>8} {'95% CI':>13} {'vs 1-NN [95% CI]':>26} {'answer F1':>9} "
          f"{'unsupported':>11} {'prompt tok':>10} {'s/answer':>8} {'approved text':>13}")
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for row in rows:
        vs = row["vs_1nn"]
        print(f"{row['system']:<44} {row['label_f1']:>8.3f} {row['label_f1_ci'][0]:>6.3f}-{row['label_f1_ci'][1]:<6.3f} "
              f"{vs['delta']:>+8.3f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}] {fmt(row.get('answer_f1'), '9.3f')} "
              f"{fmt(row.get('unsupported_facts'), '11.3f')} {fmt(row.get('prompt_tokens'), '10.0f')} "
              f"{fmt(row.get('latency_s'), '8.2f')} {fmt(row.get('verbatim'), '13d')}")


def states(answer: str, fact: str) -> bool:
    """Whether ``answer`` states ``fact`` as a whole figure ("$9", not "$90" or "$9.50")."""
    return re.search(r"(?<![\w.,])" + re.escape(fact) + r"(?![\w]|[.,]\d)", answer, re.IGNORECASE) is not None


def corrections(serve, adapter: str | None) -> dict:
    """Part 2: add each new fact for one phrasing, ask two others; the share answered with the fact.
    ``adapter`` (None = the base model) serves meanwhile; the pointer and the index are put back after."""
    from assistant import adapters
    from assistant.chat import ChatService, make_backend
    from feedback import knowledge
    from feedback.db import ThreadLocalDB
    from feedback.knowledge import KnowledgeIndex

    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    local = ThreadLocalDB()
    serving = adapters.current_version()
    adapters.set_current(adapter, "benchmarks/retrieval.py corrections")
    try:
        service = ChatService(serve, make_backend(serve), references=KnowledgeIndex(local.get))
        return _ask_corrections(service, facts, local)
    finally:
        adapters.set_current(serving, "benchmarks/retrieval.py put back the adapter in service")


def _ask_corrections(service, facts: list[dict], local) -> dict:
    from feedback import knowledge

    asked, stated, verbatim, misses, added = 0, 0, 0, [], []
    first, stated_first = 0, 0  # the correction was the first reference; and the answer then stated it
    for fact in facts:
        added.append(knowledge.add(local.get(), fact["question"], fact["answer"]))
        for paraphrase in fact["paraphrases"]:
            stream = service.answer(paraphrase)
            text = "".join(stream)
            asked += 1
            led = bool(stream.stats.sources) and stream.stats.sources[0].id == added[-1]
            first += led
            if states(text, fact["fact"]):
                stated += 1
                stated_first += led
                verbatim += stream.stats.verbatim is not None
            else:
                best = stream.stats.sources[0].score if stream.stats.sources else None
                misses.append({"asked": paraphrase, "fact": fact["fact"], "answer": text.strip(),
                               "best_reference": None if best is None else round(best, 3)})
    for entry in added:
        knowledge.remove(local.get(), entry)
    return {"facts": len(facts), "asked": asked, "stated_the_new_fact": stated, "share": round(stated / asked, 3),
            "of_which_verbatim": verbatim, "correction_first": first, "stated_when_first": stated_first,
            "adapter": service.backend.active, "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-per-intent", type=int, default=5, help="Banking77 test questions per intent (default 5: 385)")
    parser.add_argument("--home", help="an existing TUNELOOP_HOME set up with the pack (default: a fresh one, as tuneloop init)")
    parser.add_argument("--adapter", action="append", default=[], help="an adapter of --home to score on the pack (repeatable)")
    parser.add_argument("--banking77-adapter", action="append", default=[],
                        help="an adapter of --home trained on --write-banking77-snapshot's data, scored on Banking77 (repeatable)")
    parser.add_argument("--write-banking77-snapshot", metavar="DIR",
                        help="write the Banking77 sample as a dataset snapshot to DIR for `tuneloop train --dataset DIR` and stop")
    parser.add_argument("--skip", action="append", default=[], choices=("banking77", "pack", "corrections"))
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if args.write_banking77_snapshot:
        write_banking77_snapshot(Path(args.write_banking77_snapshot), args.test_per_intent)
        print(f"wrote {args.write_banking77_snapshot}; train on it with the generic persona, e.g. "
              f"tuneloop train --dataset {args.write_banking77_snapshot} --retrieval-k 3 "
              "--system-prompt \"$(python -c 'from assistant.config import DEFAULT_SYSTEM_PROMPT as p; print(p)')\"")
        return
    os.environ["TUNELOOP_HOME"] = args.home or tempfile.mkdtemp(prefix="tuneloop-bench-retrieval-")
    from assistant import paths

    paths.configure_environment()
    from assistant.chat import retrieval_for
    from assistant.config import DEFAULT_SYSTEM_PROMPT, ServeConfig, load
    from evals import evaluate as evaluation
    from feedback import datasets

    if not args.home:
        setup_pack_home()
    pack_serve = load(ServeConfig, "serve")
    results: dict = {"serve": {"backend": pack_serve.backend, "retrieval_k": pack_serve.retrieval_k,
                               "retrieval_min_score": pack_serve.retrieval_min_score,
                               "verbatim_min_score": pack_serve.verbatim_min_score if pack_serve.verbatim else None}}
    without = dataclasses.replace(pack_serve, retrieval_k=0)
    runner = None
    if {"banking77", "pack"} - set(args.skip):
        runner = evaluation.make_runner(pack_serve)
    if "banking77" not in args.skip:
        train, test_rows = banking77_sets(args.test_per_intent)
        test = evaluation.EvalSet("banking77", test_rows, train, [])
        generic = dataclasses.replace(pack_serve, system_prompt=DEFAULT_SYSTEM_PROMPT)
        systems = [("base model, no references", None, dataclasses.replace(generic, retrieval_k=0)),
                   (f"base model + {generic.retrieval_k} references", None, generic)]
        for version in args.banking77_adapter:
            k, _ = retrieval_for(version, generic)
            systems.append((f"adapter {version} ({f'{k} references' if k else 'no references'})", version, generic))
        rows = score_rows("banking77", test, systems, runner, evaluation.labeler_for(test))
        print_table(f"Banking77, {len(train)} training questions", len(test_rows), rows)
        results["banking77"] = rows
    if "pack" not in args.skip:
        snapshot = datasets.latest_snapshot()
        test = evaluation.load_test_set(evaluation.EvalConfig(dataset=str(snapshot)))
        systems = [("base model, no references", None, without),
                   (f"base model + {pack_serve.retrieval_k} references", None, pack_serve)]
        for version in args.adapter:
            k, _ = retrieval_for(version, pack_serve)
            systems.append((f"adapter {version} ({f'{k} references' if k else 'no references'})", version, pack_serve))
        rows = score_rows("pack", test, systems, runner, evaluation.labeler_for(test))
        print_table(f"Peach State Bank pack, {snapshot.name}", len(test.examples), rows)
        results["pack"] = rows
    runner = None  # its model's memory goes before the chat backend loads its own
    for adapter in [None, *args.adapter] if "corrections" not in args.skip else []:
        found = corrections(pack_serve, adapter)
        results.setdefault("corrections", []).append(found)
        print(f"\ncorrections before any retrain, {found['adapter'] or 'base model'} serving: {found['stated_the_new_fact']} of "
              f"{found['asked']} paraphrases ({found['share']:.0%}) of {found['facts']} new facts answered with the new fact, "
              f"{found['of_which_verbatim']} of them with the approved text itself; the correction was the first "
              f"reference for {found['correction_first']}, of which {found['stated_when_first']} stated it", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
