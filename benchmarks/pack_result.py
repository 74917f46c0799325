"""The reference result on the shipped Peach State Bank pack: the generic base model, its few-shot
prompt, and the fine-tuned adapter, on the pack's held-out test questions, on this machine.

Runs the product's own jobs in order on a fresh home: ``tuneloop init`` (model, pack, dataset),
then the nightly job ``tuneloop retrain`` with the default recipe (or the overrides given): training
in its own process, evaluation of base, few-shot base and candidate in the served configuration,
and the promotion gate against the base model. Prints label F1 (the gate metric), answer F1,
ROUGE-L, latency and prompt tokens for each system, the training time and the gate's reasons. The
docs/results.md quotes this output.

    .venv/bin/python benchmarks/pack_result.py [--method qlora] [--epochs 1] [--lr 0] [--replay 0] [--neftune 0] [--augment 0] [--hints 0] [--retrieval-k 0] [--seed N] [--limit 0]
    .venv/bin/python benchmarks/pack_result.py --home H --report-only   # reprint an earlier run's figures
    .venv/bin/python benchmarks/pack_result.py --import benchmarks/data/pack_more_questions.jsonl --epochs 3.5

``--import FILE`` adds labelled questions after ``tuneloop init``, as ``tuneloop data import FILE`` does:
into train and val only, so the test questions and the base model's figures stay those of the pack.
``benchmarks/data/pack_more_questions.jsonl`` holds 440 questions written for this (25 per product,
40 out of scope), each reusing an answer of its label from the pack word for word: it measures what
more varied training questions buy at about the same number of training steps (``--epochs`` scaled
down to match).

Each label F1 comes with its 95% bootstrap interval over the test questions, and the question
classifier (MiniLM + logistic regression on the training questions, the bar to beat while
answering in words) is scored on the same questions and compared with the fine-tuned model by a
paired bootstrap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


RUN_ONLY = ("method", "epochs", "lr", "replay", "neftune", "augment", "hints", "retrieval_k", "seed", "max_steps", "limit", "import_file")
"""Options that shape a new run, meaningless with ``--report-only``."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="runtime home to use (default: a fresh temporary folder)")
    parser.add_argument("--method", default="", help="qlora, lora or full (default: the trainer's default)")
    parser.add_argument("--epochs", type=float, default=0, help="training epochs (default: the trainer's default)")
    parser.add_argument("--lr", type=float, default=0, help="learning rate (default: the trainer's measured default)")
    parser.add_argument("--replay", type=float, default=0, help="base-model replay rows per training example (default: the trainer's)")
    parser.add_argument("--neftune", type=float, default=0, help="NEFTune noise alpha (default: the trainer's)")
    parser.add_argument("--augment", type=float, default=0, help="noisy copies per training question (default: the trainer's)")
    parser.add_argument("--hints", type=int, default=None, help="topic hints: labels per prompt, 0 = none (default: the trainer's)")
    parser.add_argument("--retrieval-k", type=int, default=None,
                        help="references per training prompt, 0 = none (default: the trainer's); served with them too")
    parser.add_argument("--seed", type=int, default=None, help="training seed: adapter init, shuffling, dropout (default: the trainer's)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop training after N steps (0 = all epochs)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N test questions only (0 = all)")
    parser.add_argument("--import", dest="import_file", metavar="FILE",
                        help="after init, import these labelled questions into train and val (as `tuneloop data import`)")
    parser.add_argument("--output", help="also write the figures as JSON here")
    parser.add_argument("--report-only", action="store_true",
                        help="print the figures of the newest nightly run already in --home; train nothing")
    args = parser.parse_args()
    if args.report_only:
        if not args.home:
            parser.error("--report-only needs --home, the home of an earlier run")
        # Training and evaluation options would be silently ignored: the figures are the earlier run's.
        ignored = [action.option_strings[0] for action in parser._actions
                   if action.dest in RUN_ONLY and getattr(args, action.dest) != action.default]
        if ignored:
            parser.error(f"--report-only trains nothing, so {', '.join(ignored)} would be ignored; drop them")
    os.environ["TUNELOOP_HOME"] = args.home or tempfile.mkdtemp(prefix="tuneloop-pack-result-")

    from assistant import paths

    paths.configure_environment()
    started = time.perf_counter()
    result = newest_run() if args.report_only else run(args)
    report(result, args.output)
    if not args.report_only:
        print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def run(args: argparse.Namespace) -> dict:
    """``tuneloop init``, then the nightly job with the overrides given; returns the job's result."""
    from tuneloop import cli
    from tuneloop import pipeline
    from trainer.config import TrainConfig

    if cli.main(["init"]) != 0:
        raise SystemExit("tuneloop init failed (its message is above); nothing was trained")
    if args.import_file and cli.main(["data", "import", args.import_file]) != 0:
        raise SystemExit(f"importing {args.import_file} failed (its message is above); nothing was trained")
    overrides = {k: v for k, v in {"method": args.method, "epochs": args.epochs, "lr": args.lr,
                                   "max_steps": args.max_steps, "replay": args.replay,
                                   "neftune_alpha": args.neftune, "augment": args.augment}.items() if v}
    if args.seed is not None:  # 0 is a seed like any other
        overrides["seed"] = args.seed
    if args.hints is not None:  # 0 turns them off
        overrides["hints"] = args.hints
    if args.retrieval_k is not None:
        overrides["retrieval_k"] = args.retrieval_k
    # The nightly job as cron runs it (training's progress bar shows on stderr), minus the staff
    # review batch; the gate is the configured one.
    return pipeline.main(pipeline.RetrainConfig(review_samples=0, limit=args.limit), train=TrainConfig(**overrides))


def newest_run() -> dict:
    """The candidate, verdict and reasons of the newest gate decision in the home's database."""
    from evals import schema

    rows = list(schema.connect().query("select candidate, promote, reasons from gate_decisions order by id desc limit 1"))
    if not rows:
        raise SystemExit(f"no gate decision under {os.environ['TUNELOOP_HOME']}: run pack_result.py without --report-only first")
    return {"candidate": rows[0]["candidate"], "promoted": bool(rows[0]["promote"]), "reasons": json.loads(rows[0]["reasons"])}


def report(result: dict, output: str | None) -> None:
    """Print the figures of a finished run (and write them as JSON to ``output``)."""
    from assistant import adapters

    folder = adapters.adapter_path(result["candidate"])
    reports = json.loads((folder / "eval_report.json").read_text())
    rows = {"base model": reports["base"], "base + few-shot": reports["few_shot"], "fine-tuned": reports["candidate"]}
    provenance = json.loads((folder / "provenance.json").read_text())
    config, trained = provenance["train_config"], provenance["result"]
    print(f"Peach State Bank pack, {reports['candidate']['n']} held-out test questions; base {provenance['base_model']} "
          f"served nf4 on CPU ({os.cpu_count()} cores)")
    print(f"recipe: {trained['method']}, r={config['lora_r']}, alpha={config['lora_alpha']}, lr={config['lr']}, "
          f"epochs={config['epochs']}, batch={config['batch_size']}, replay={config['replay']}, neftune={config.get('neftune_alpha', 0)}, augment={config.get('augment', 0)}, hints={config.get('hints', 0)}, retrieval_k={config.get('retrieval_k', 0)}, seed={config['seed']}; "
          f"{trained['train_examples']} train ({trained.get('augmented_examples', 0)} noisy copies) "
          f"+ {trained['replay_examples']} replay / "
          f"{trained['val_examples']} val examples; {trained['steps']} steps (best {trained['best_step']}), "
          f"stopped early: {trained['stopped_early']}; val loss {trained['base_val_loss']:.3f} -> {trained['val_loss']:.3f}"
          f"{forgetting(trained)}; "
          f"training {trained['seconds'] / 60:.1f} min ({trained['tokens_per_s']:.0f} real tokens/s)")
    examples = stored_examples(result["candidate"])
    for role, name in (("base", "base model"), ("few_shot", "base + few-shot"), ("candidate", "fine-tuned")):
        if rows[name].get("f1_ci") is None:  # a run from before reports carried the interval
            rows[name]["f1_ci"] = label_interval([e["label"] for e in examples[role]], [e["predicted_label"] for e in examples[role]])
    bar = classifier_bar(examples["candidate"], reports["candidate"]["dataset"])
    rows["question classifier"] = bar["report"]
    print(f"{'system':<20}{'label F1':>9}{'95% CI':>13}{'precision':>10}{'recall':>8}{'answer F1':>10}{'ROUGE-L':>8}"
          f"{'latency s':>10}{'prompt tok':>11}")
    for name, r in rows.items():
        interval = "-" if r.get("f1_ci") is None else f"{r['f1_ci'][0]:.3f}-{r['f1_ci'][1]:.3f}"
        cells = [f"{r[k]:>{w}.{d}f}" if r.get(k) is not None else f"{'-':>{w}}" for k, w, d in
                 (("answer_f1", 10, 3), ("rouge_l", 8, 3), ("latency_s", 10, 2), ("prompt_tokens", 11, 0))]
        print(f"{name:<20}{r['label_f1']:>9.3f}{interval:>13}{r['label_precision']:>10.3f}{r['label_recall']:>8.3f}"
              + "".join(cells))
    gain = bar["gain"]
    print(f"fine-tuned vs question classifier (paired bootstrap, n={bar['n']}): label F1 {gain['delta']:+.3f}, "
          f"95% CI [{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}], p_not_better {gain['p_not_better']:.3f}")
    print(f"gate: {'promoted' if result['promoted'] else 'rejected'} {result['candidate']}")
    for reason in result["reasons"]:
        print(f"  {reason}")
    if output:
        Path(output).write_text(json.dumps({"train": trained, "gate": result, "classifier_gain": gain, "systems": {
            k: {m: v.get(m) for m in ("label_f1", "f1_ci", "answer_f1", "rouge_l", "bleu", "latency_s", "prompt_tokens", "n")}
            for k, v in rows.items()}}, indent=2))


def stored_examples(candidate: str) -> dict[str, list[dict]]:
    """Per-question rows (label, predicted label) of each system the candidate's nightly run evaluated."""
    from evals import schema

    db = schema.connect()
    run_id = next(db.query("select run_id from eval_reports where role = 'candidate' and adapter = ? order by id desc limit 1",
                           [candidate]))["run_id"]
    rows = db.query("select role, report from eval_reports where run_id = ? order by id", [run_id])
    return {row["role"]: json.loads(row["report"])["examples"] for row in rows}


def label_interval(truth: list[str], predicted: list[str]) -> list[float]:
    """95% bootstrap interval of label F1, as the reports' ``f1_ci`` holds it."""
    from evals import metrics

    interval = metrics.bootstrap_interval(metrics.macro_f1, truth, predicted)
    return [interval["ci_low"], interval["ci_high"]]


def classifier_bar(examples: list[dict], dataset: str) -> dict:
    """The bar the fine-tuned model should beat, on the very test questions it answered.

    MiniLM + logistic regression (C=1, the better of the two strengths ``banking77_baseline.py``
    measures on the pack) fitted on the snapshot's training questions labels each test question
    directly; a paired bootstrap then compares the candidate's labels with it question by question.
    """
    from assistant import paths
    from banking77_baseline import question_classifier
    from evals import metrics
    from feedback import datasets

    train = [(r["question"], r["label"]) for r in datasets.load_split(paths.datasets_dir() / dataset, "train") if r.get("label")]
    truth = [e["label"] for e in examples]
    predicted = question_classifier(train, [e["question"] for e in examples], c=1.0)
    scores = metrics.label_scores(truth, predicted)
    return {
        "n": len(examples),
        "report": {"label_f1": scores["f1"], "f1_ci": label_interval(truth, predicted),
                   "label_precision": scores["precision"], "label_recall": scores["recall"]},
        "gain": metrics.bootstrap_gain(metrics.macro_f1, truth, predicted, [e["predicted_label"] for e in examples]),
    }


def forgetting(trained: dict) -> str:
    """The trainer's own forgetting figure for the kept weights (on passages the gate does not check)."""
    if trained.get("perplexity_ratio") is None:
        return ""
    bar = {True: "within", False: "over", None: "no"}[trained["within_perplexity_bar"]]
    return f", general-text perplexity {trained['perplexity_ratio']:.2f}x at the kept step ({bar} bar)"


if __name__ == "__main__":
    sys.exit(main())
