"""The reference result on the shipped Peach State Bank pack: the generic base model, its few-shot
prompt, and the fine-tuned adapter, on the pack's held-out test questions, on this machine.

Runs the product's own jobs in order on a fresh home: ``tuneloop init`` (model, pack, dataset),
training in its own process with the default recipe (or the overrides given), then evaluation in
the served configuration. Prints label F1 (the gate metric), answer F1, ROUGE-L, latency and prompt
tokens for each system, and the training time. The README quotes this output.

    .venv/bin/python benchmarks/pack_result.py [--method qlora] [--epochs 3] [--lr 0] [--limit 0]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="runtime home to use (default: a fresh temporary folder)")
    parser.add_argument("--method", default="", help="qlora, lora or full (default: the trainer's default)")
    parser.add_argument("--epochs", type=float, default=0, help="training epochs (default: the trainer's default)")
    parser.add_argument("--lr", type=float, default=0, help="learning rate (default: the trainer's measured default)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop training after N steps (0 = all epochs)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N test questions only (0 = all)")
    parser.add_argument("--output", help="also write the figures as JSON here")
    args = parser.parse_args()
    os.environ["TUNELOOP_HOME"] = args.home or tempfile.mkdtemp(prefix="tuneloop-pack-result-")

    import cli
    from assistant import paths

    paths.configure_environment()
    from evals.evaluate import EvalConfig
    from evals.evaluate import main as evaluate
    from trainer.config import TrainConfig
    from trainer.train import train_in_subprocess

    started = time.perf_counter()
    assert cli.main(["init"]) == 0
    overrides = {k: v for k, v in {"method": args.method, "epochs": args.epochs, "lr": args.lr,
                                   "max_steps": args.max_steps}.items() if v}
    train_started = time.perf_counter()
    trained = train_in_subprocess(TrainConfig(**overrides))  # its progress bar shows on stderr
    train_minutes = (time.perf_counter() - train_started) / 60
    report = evaluate(EvalConfig(adapter=trained.adapter, baselines=True, limit=args.limit))
    rows = {"base model": report["baselines"]["base"], "base + few-shot": report["baselines"]["few_shot"],
            "fine-tuned": report}
    provenance = json.loads((Path(trained.path) / "provenance.json").read_text())
    config = provenance.get("train_config", {})
    print(f"Peach State Bank pack, {report['n']} held-out test questions; base {provenance.get('base_model')} "
          f"served nf4 on CPU ({os.cpu_count()} cores)")
    print(f"recipe: {trained.method}, r={config.get('lora_r')}, alpha={config.get('lora_alpha')}, lr={config.get('lr')}, "
          f"epochs={config.get('epochs')}, batch={config.get('batch_size')}; {trained.train_examples} train / "
          f"{trained.val_examples} val examples; {trained.steps} steps (best {trained.best_step}), "
          f"stopped early: {trained.stopped_early}; val loss {trained.base_val_loss:.3f} -> {trained.val_loss:.3f}; "
          f"training {train_minutes:.1f} min")
    print(f"{'system':<18}{'label F1':>9}{'precision':>10}{'recall':>8}{'answer F1':>10}{'ROUGE-L':>8}"
          f"{'latency s':>10}{'prompt tok':>11}")
    for name, r in rows.items():
        print(f"{name:<18}{r['label_f1']:>9.3f}{r['label_precision']:>10.3f}"
              f"{r['label_recall']:>8.3f}{r['answer_f1']:>10.3f}{r['rouge_l']:>8.3f}"
              f"{r['latency_s']:>10.2f}{r['prompt_tokens']:>11.0f}")
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    if args.output:
        Path(args.output).write_text(json.dumps({"train": trained.as_json(), "systems": {
            k: {m: v.get(m) for m in ("label_f1", "answer_f1", "rouge_l", "bleu", "latency_s", "prompt_tokens", "n")}
            for k, v in rows.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
