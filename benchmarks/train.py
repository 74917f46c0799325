"""Training throughput: tuneloop's trainer against a naive HF Trainer baseline, and lora vs qlora vs full.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train.py --quick     # about 5 minutes on 2 busy CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train.py --examples 200 --steps 25

Every variant trains the default base (SmolLM2-135M-Instruct) on the same banking77 examples
(answers "This is about <intent>."), same seed, same number of optimizer steps, each in its own
fresh process (a fresh 4-bit base, and a clean peak-RSS reading):

- ``tuneloop``: QLoRA as ``tuneloop train`` runs it: length-grouped batches, each padded to its own
  longest example, the system prompt every example starts with computed once per batch.
- ``no-prefix``: the same, computing the shared system prompt once per example (separates the
  prefix-sharing gain).
- ``fp32``: the same, with fp32 compute (what ``precision = "auto"`` picks on a CPU without
  native bf16); separates the batching gain from the precision gain.
- ``naive``: the same QLoRA through HF Trainer in fp32 with shuffled batches, every one padded to
  the longest example of the data set (a static shape, as ``padding="max_length"`` scripts do;
  padding to the config's 512 would make the baseline 3x slower still).
- ``lora`` and ``full``: tuneloop's batching on the unquantized base (LoRA, full fine-tuning).

Figures: real (non-pad) tokens per second of optimizer-step time, seconds per step, peak RSS,
trainable parameters, the mean train loss of the last steps and the validation loss at the end
(per answer token, one example at a time, so batching cannot change it), so a faster run that
learns less would show.

Measured here (``--quick``, 2 shared CPU cores, OMP_NUM_THREADS=1, 2026-11-28), two runs, before
``precision = "auto"`` existed (every variant then computed in fp32; the ``fp32`` variant and the
bf16 ``tuneloop`` variant have not been run through this script yet)::

    variant  method  trainable     peak RSS  s/step     real tok/s   val loss
    tuneloop qlora     4,884,480   4.9-5.1 GB  5.2-6.0   99-113     1.78
    naive    qlora     4,884,480   5.1-5.2 GB  7.0-9.0   66-85      1.84
    lora     lora      4,884,480   4.2-4.3 GB  4.9-6.7   89-120     1.72
    full     full    134,515,008   4.1-4.2 GB  6.1       96-97      2.14

Shared-prefix training (``--quick --variants tuneloop,no-prefix``, idle CPU, bf16, 2026-11-28, one
run): tuneloop 1.46 s/step, 405 real tok/s, peak RSS 2.9 GB vs no-prefix 2.07 s/step, 285 tok/s,
4.2 GB (1.42x tokens/s; train loss 1.615 vs 1.613, val loss 1.783 vs 1.779: the same learning).
On the Peach State Bank pack, whose persona is longer, steps went from 4.7-5.5 s to 2.1-2.3 s.

tuneloop vs naive: 1.51x and 1.34x real tokens/s. banking77 examples are 74 tokens on average and
115 at most (the system prompt is most of each), so padding wastes at most 1.56x here; the gain
grows with the spread of lengths. The first step's one-time setup is inside the 8 timed steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BANKING77 = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data")) / "banking77" / "train.csv"
VARIANTS = {
    "tuneloop": {"method": "qlora", "group_by_length": True, "pad_to_max": False, "precision": "auto", "share_prefix": True},
    "no-prefix": {"method": "qlora", "group_by_length": True, "pad_to_max": False, "precision": "auto", "share_prefix": False},
    "fp32": {"method": "qlora", "group_by_length": True, "pad_to_max": False, "precision": "fp32", "share_prefix": True},
    "naive": {"method": "qlora", "group_by_length": False, "pad_to_max": True, "precision": "fp32", "share_prefix": False},
    "lora": {"method": "lora", "group_by_length": True, "pad_to_max": False, "precision": "auto", "share_prefix": True},
    "full": {"method": "full", "group_by_length": True, "pad_to_max": False, "precision": "auto", "share_prefix": True},
}


def banking77_rows(n: int, seed: int = 0) -> list[dict]:
    with open(BANKING77, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    random.Random(seed).shuffle(rows)
    return [{"question": r["text"], "answer": f"This is about {r['category'].replace('_', ' ')}."} for r in rows[:n]]


def run_variant(name: str, examples: int, val_examples: int, steps: int, batch_size: int) -> dict:
    """One variant in this process; returns its figures."""
    from assistant import model as base_models
    from assistant import paths
    from trainer import data
    from trainer.config import TrainConfig, resolve
    from trainer.loop import fit
    from trainer.model import effective_precision, load_for_training

    paths.configure_environment()
    spec = VARIANTS[name]
    cfg = resolve(TrainConfig(
        method=spec["method"], device="cpu", max_steps=steps, epochs=100, batch_size=batch_size,
        group_by_length=spec["group_by_length"], eval_steps=10_000, patience=0, progress=False,
        precision=spec["precision"],
    ))
    rows = banking77_rows(examples + val_examples)
    tokenizer, model = load_for_training(base_models.prepare(cfg.base_model), cfg)
    train_set, _ = data.encode_rows(tokenizer, cfg.system_prompt, rows[:examples], cfg.max_length)
    val_set, _ = data.encode_rows(tokenizer, cfg.system_prompt, rows[examples:], cfg.max_length)
    longest = max(len(e["input_ids"]) for e in train_set)
    collator = data.PadCollator(tokenizer.pad_token_id, pad_to=longest if spec["pad_to_max"] else None,
                                share_prefix=spec["share_prefix"])
    outcome = fit(cfg, tokenizer, model, train_set, val_set, collator=collator)
    val_loss = token_weighted_loss(model, val_set)
    losses = [e["loss"] for e in outcome.history["train"]]
    return {
        "variant": name,
        "method": cfg.method,
        "precision": effective_precision(cfg),
        "lr": cfg.lr,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": outcome.steps,
        "s_per_step": round(outcome.train_seconds / outcome.steps, 3),
        "real_tokens_per_s": outcome.tokens_per_s,
        "final_train_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
        "val_loss": round(val_loss, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "longest_example": longest,
        "mean_example": round(sum(len(e["input_ids"]) for e in train_set) / len(train_set), 1),
    }


def token_weighted_loss(model, examples: list[dict]) -> float:
    """Validation loss per answer token, one example at a time: unlike HF Trainer's mean of batch
    means, it does not depend on how examples were batched or padded."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            labels = torch.tensor([example["labels"]])
            loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss
            tokens = int((labels[:, 1:] != -100).sum())
            total, count = total + loss.item() * tokens, count + tokens
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 examples, 8 steps, every variant (about 5 min)")
    parser.add_argument("--examples", type=int, default=200, help="training examples (banking77)")
    parser.add_argument("--val-examples", type=int, default=32, help="validation examples")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.val_examples, args.steps = 64, 16, 8
    if not BANKING77.exists():
        print(f"benchmark needs {BANKING77} (set TUNELOOP_SHARED_DATA)", file=sys.stderr)
        return 2
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.examples, args.val_examples, args.steps, args.batch_size)))
        return 0

    started = time.perf_counter()
    results = []
    for name in args.variants.split(","):
        command = [
            sys.executable, str(Path(__file__).resolve()), "--variant", name, "--examples", str(args.examples),
            "--val-examples", str(args.val_examples), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        ]
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(completed.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", file=sys.stderr, flush=True)
    by_name = {r["variant"]: r for r in results}
    summary = {"examples": args.examples, "steps": args.steps, "batch_size": args.batch_size, "seconds": round(time.perf_counter() - started), "variants": results}
    if "tuneloop" in by_name and "naive" in by_name:
        summary["speedup_real_tokens_per_s"] = round(by_name["tuneloop"]["real_tokens_per_s"] / by_name["naive"]["real_tokens_per_s"], 2)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    first = results[0]
    print(f"banking77: {args.examples} train / {args.val_examples} val examples, {args.steps} steps of {args.batch_size}, "
          f"example length mean {first['mean_example']} / longest {first['longest_example']} tokens, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    header = f"{'variant':<9} {'method':<6} {'prec':<5} {'trainable':>11} {'peak RSS':>9} {'s/step':>7} {'real tok/s':>10} {'train loss':>10} {'val loss':>9}"
    print(header)
    for r in results:
        print(f"{r['variant']:<9} {r['method']:<6} {r['precision']:<5} {r['trainable_params']:>11,} {r['peak_rss_mb']:>7} MB {r['s_per_step']:>7.2f} "
              f"{r['real_tokens_per_s']:>10.1f} {r['final_train_loss']:>10.4f} {r['val_loss']:>9.4f}")
    if "speedup_real_tokens_per_s" in summary:
        print(f"tuneloop vs naive: {summary['speedup_real_tokens_per_s']}x real tokens/s")
    print(f"total {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
