"""``tuneloop train``: train a new adapter in this (fresh) process; a thin wrapper over
:func:`trainer.train.main`. Heavy libraries load inside the handler so ``--help`` stays instant."""

from __future__ import annotations

import json
import sys

from assistant import progress
from assistant.config import add_arguments, from_args
from trainer.config import TrainConfig, resolve_configs


def cmd_train(args) -> int:
    """Train a new LoRA/QLoRA adapter on the latest dataset snapshot and write it under adapters/ (not promoted)."""
    from assistant.adapters import AdapterError
    from assistant.model import ModelError
    from trainer.data import DatasetError
    from trainer.train import TrainError, main

    cfg, _serve = resolve_configs(from_args(TrainConfig, "train", args))
    try:
        with progress.on_stderr(cfg.progress):  # --no-progress hides the stages as well as the step bar
            result = main(cfg)
    except (DatasetError, TrainError, ModelError, AdapterError) as exc:
        print(f"tuneloop train: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        early = ", stopped early" if result.stopped_early else ""
        print(
            f"adapter {result.adapter} ({result.method}) at {result.path}\n"
            f"val loss {result.val_loss:.4f} (base {result.base_val_loss:.4f}), train loss {result.train_loss:.4f}, "
            f"kept step {result.best_step} of {result.steps}{early}; {result.tokens_per_s:.0f} tokens/s, {result.seconds:.0f} s"
        )
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument(
        "--json",
        action="store_true",
        help="print adapter, path, train_loss, val_loss, stopped_early, seconds, tokens_per_s (and more) as JSON",
    )
    add_arguments(p, TrainConfig)
    p.set_defaults(handler=cmd_train)
