"""The repetition penalty's scope: over the whole prompt and the answer (transformers' own, what
tuneloop served until 2026-12-05), not at all, or over the answer only (``[serve] penalize_prompt``).

    .venv/bin/python benchmarks/repetition_penalty.py --home H [--adapter V ...] [--base] [--limit N]

Every system (each ``--adapter`` of ``--home``, and the base with ``--base``) answers the home's
latest snapshot's test questions under each setting, as ``tuneloop eval`` does (``evals.evaluate``,
on the backend serving picks: llama.cpp on a CPU; references as served). Columns: label F1, answer
F1, ``unsupported_facts``, answers that loop (a 4-word sequence three times or more), tokens per
answer; and for label and answer F1 the difference from the first setting with its 95%
paired-bootstrap interval over the test questions.

Why it matters: the penalty divides the logit of every token the prompt holds. The persona names
the products and the references state the figures, exactly the tokens a grounded answer repeats.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = (("1.1 on prompt + answer", 1.1, True), ("none (1.0)", 1.0, True), ("1.1 on the answer", 1.1, False))


def loops(text: str) -> bool:
    """Whether an answer repeats a 4-word sequence three times or more (a small model's loop)."""
    words = text.split()
    grams = collections.Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return max(grams.values(), default=0) >= 3


def score(report, first=None) -> dict:
    from evals import metrics

    examples = report.examples
    row = {"label_f1": report.label_f1, "answer_f1": report.answer_f1, "unsupported": report.unsupported_facts,
           "looping": sum(loops(e["answer"]) for e in examples), "tokens": report.tokens_per_answer, "n": report.n}
    if first is not None:
        truth = [e["label"] for e in examples]
        if report.label_f1 is not None:
            gain = metrics.bootstrap_gain(metrics.macro_f1, truth, [e["predicted_label"] for e in first.examples],
                                          [e["predicted_label"] for e in examples])
            row["label_delta"] = (gain["delta"], gain["ci_low"], gain["ci_high"])
        gain = metrics.bootstrap_gain(metrics.mean_score, None, [e["answer_f1"] for e in first.examples],
                                      [e["answer_f1"] for e in examples])
        row["answer_delta"] = (gain["delta"], gain["ci_low"], gain["ci_high"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True, help="a $TUNELOOP_HOME with a dataset snapshot (and adapters)")
    parser.add_argument("--adapter", action="append", default=[], help="an adapter version of --home (repeatable)")
    parser.add_argument("--base", action="store_true", help="also the base model without an adapter")
    parser.add_argument("--limit", type=int, default=0, help="only the first N test questions")
    args = parser.parse_args(argv)
    os.environ["TUNELOOP_HOME"] = str(Path(args.home).resolve())
    from assistant import paths
    from assistant.config import ServeConfig, load
    from evals import evaluate

    paths.configure_environment()
    systems = args.adapter + (["base"] if args.base else [])
    if not systems:
        parser.error("name at least one --adapter, or --base")
    serve = load(ServeConfig, "serve")
    print(f"{'system':<24} {'penalty':<23} {'label F1':>8} {'vs first [95% CI]':>24} {'answer F1':>9} "
          f"{'vs first [95% CI]':>24} {'unsupported':>11} {'looping':>7} {'tokens':>6}")
    for system in systems:
        first = None
        for name, penalty, on_prompt in SETTINGS:
            cfg = dataclasses.replace(serve, repetition_penalty=penalty, penalize_prompt=on_prompt)
            report = evaluate.main(evaluate.EvalConfig(adapter=system, limit=args.limit), cfg)
            row = score(report, first)
            first = first or report
            label = "-" if row["label_f1"] is None else f"{row['label_f1']:.3f}"
            deltas = ["" if key not in row else f"{row[key][0]:+.3f} [{row[key][1]:+.3f}, {row[key][2]:+.3f}]"
                      for key in ("label_delta", "answer_delta")]
            print(f"{system:<24} {name:<23} {label:>8} {deltas[0]:>24} {row['answer_f1']:>9.3f} {deltas[1]:>24} "
                  f"{row['unsupported']:>11.3f} {row['looping']:>4}/{row['n']:<3} {row['tokens']:>5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
