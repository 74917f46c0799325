"""The reference result on the shipped Peach State Bank pack: the generic base model, its few-shot
prompt, and the fine-tuned adapter, on the pack's held-out test questions, on this machine.

Runs the product's own jobs in order on a fresh home: ``tuneloop init`` (model, pack, dataset),
then the nightly job ``tuneloop retrain`` with the default recipe (or the overrides given): training
in its own process, evaluation of base, few-shot base and candidate in the served configuration,
and the promotion gate against the base model. Prints label F1 (the gate metric), answer F1,
ROUGE-L, latency and prompt tokens for each system, the training time and the gate's reasons. The
README quotes this output.

    .venv/bin/python benchmarks/pack_result.py [--method qlora] [--epochs 1] [--lr 0] [--replay 0] [--neftune 0] [--augment 0] [--hints 0] [--seed N] [--limit 0]
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
    parser.add_argument("--replay", type=float, default=0, help="base-model replay rows per training example (default: the trainer's)")
    parser.add_argument("--neftune", type=float, default=0, help="NEFTune noise alpha (default: the trainer's)")
    parser.add_argument("--augment", type=float, default=0, help="noisy copies per training question (default: the trainer's)")
    parser.add_argument("--hints", type=int, default=None, help="topic hints: labels per prompt, 0 = none (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=None, help="training seed: adapter init, shuffling, dropout (default: the trainer's)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop training after N steps (0 = all epochs)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N test questions only (0 = all)")
    parser.add_argument("--output", help="also write the figures as JSON here")
    args = parser.parse_args()
    os.environ["TUNELOOP_HOME"] = args.home or tempfile.mkdtemp(prefix="tuneloop-pack-result-")

    import cli
    import pipeline
    from assistant import adapters, paths

    paths.configure_environment()
    from trainer.config import TrainConfig

    started = time.perf_counter()
    assert cli.main(["init"]) == 0
    overrides = {k: v for k, v in {"method": args.method, "epochs": args.epochs, "lr": args.lr,
                                   "max_steps": args.max_steps, "replay": args.replay,
                                   "neftune_alpha": args.neftune, "augment": args.augment}.items() if v}
    if args.seed is not None:  # 0 is a seed like any other
        overrides["seed"] = args.seed
    if args.hints is not None:  # 0 turns them off
        overrides["hints"] = args.hints
    # The nightly job as cron runs it (training's progress bar shows on stderr), minus the staff
    # review batch; the gate is the configured one.
    result = pipeline.main(pipeline.RetrainConfig(review_samples=0, limit=args.limit), train=TrainConfig(**overrides))
    folder = adapters.adapter_path(result["candidate"])
    reports = json.loads((folder / "eval_report.json").read_text())
    rows = {"base model": reports["base"], "base + few-shot": reports["few_shot"], "fine-tuned": reports["candidate"]}
    provenance = json.loads((folder / "provenance.json").read_text())
    config, trained = provenance["train_config"], provenance["result"]
    print(f"Peach State Bank pack, {reports['candidate']['n']} held-out test questions; base {provenance['base_model']} "
          f"served nf4 on CPU ({os.cpu_count()} cores)")
    print(f"recipe: {trained['method']}, r={config['lora_r']}, alpha={config['lora_alpha']}, lr={config['lr']}, "
          f"epochs={config['epochs']}, batch={config['batch_size']}, replay={config['replay']}, neftune={config.get('neftune_alpha', 0)}, augment={config.get('augment', 0)}, hints={config.get('hints', 0)}, seed={config['seed']}; "
          f"{trained['train_examples']} train ({trained.get('augmented_examples', 0)} noisy copies) "
          f"+ {trained['replay_examples']} replay / "
          f"{trained['val_examples']} val examples; {trained['steps']} steps (best {trained['best_step']}), "
          f"stopped early: {trained['stopped_early']}; val loss {trained['base_val_loss']:.3f} -> {trained['val_loss']:.3f}"
          f"{forgetting(trained)}; "
          f"training {trained['seconds'] / 60:.1f} min ({trained['tokens_per_s']:.0f} real tokens/s)")
    print(f"{'system':<18}{'label F1':>9}{'95% CI':>13}{'precision':>10}{'recall':>8}{'answer F1':>10}{'ROUGE-L':>8}"
          f"{'latency s':>10}{'prompt tok':>11}")
    for name, r in rows.items():
        low, high = r["f1_ci"]
        print(f"{name:<18}{r['label_f1']:>9.3f}{f'{low:.3f}-{high:.3f}':>13}{r['label_precision']:>10.3f}"
              f"{r['label_recall']:>8.3f}{r['answer_f1']:>10.3f}{r['rouge_l']:>8.3f}"
              f"{r['latency_s']:>10.2f}{r['prompt_tokens']:>11.0f}")
    print(f"gate: {'promoted' if result['promoted'] else 'rejected'} {result['candidate']}")
    for reason in result["reasons"]:
        print(f"  {reason}")
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    if args.output:
        Path(args.output).write_text(json.dumps({"train": trained, "gate": result, "systems": {
            k: {m: v.get(m) for m in ("label_f1", "f1_ci", "answer_f1", "rouge_l", "bleu", "latency_s", "prompt_tokens", "n")}
            for k, v in rows.items()}}, indent=2))
    return 0


def forgetting(trained: dict) -> str:
    """The trainer's own forgetting figure for the kept weights (on passages the gate does not check)."""
    if trained.get("perplexity_ratio") is None:
        return ""
    bar = {True: "within", False: "over", None: "no"}[trained["within_perplexity_bar"]]
    return f", general-text perplexity {trained['perplexity_ratio']:.2f}x at the kept step ({bar} bar)"


if __name__ == "__main__":
    sys.exit(main())
