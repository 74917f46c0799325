"""The nightly job's work in its own process, against ``$TUNELOOP_HOME``, for the reliability tests.

    python tests/reliability/retrain_job.py curate-loop --seconds 20 [--train TINY_MODEL_DIR]
    python tests/reliability/retrain_job.py promote --snapshot DIR --candidate VERSION --pause before|after

``curate-loop`` imports a slice of the shipped pack, then curates (``feedback.curate``) over and
over while customers chat, training one candidate on the tiny model in a trainer subprocess
(``trainer.train.train_in_subprocess``) when ``--train`` is given. It prints ``ready`` after the first
snapshot and ``done {json}`` at the end.

``promote`` runs the real ``pipeline.main`` with training, evaluation and the gate replaced by
stand-ins that pass, and stops for good inside the pointer flip: ``before`` the ``os.replace`` of
``current.json`` or just ``after`` it, printing ``promoting`` so the test can ``kill -9`` it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PACK_QA = REPO / "assistant" / "packs" / "peach_state_bank" / "qa.jsonl"


def curate_loop(seconds: float, examples: int, tiny_model: str) -> dict:
    from feedback import curate, examples as imports
    from feedback.db import connect

    db = connect()
    pack = [json.loads(line) for line in PACK_QA.read_text(encoding="utf-8").splitlines() if line.strip()]
    imported = imports.import_rows(db, pack[:examples], source="pack").imported
    # Silver on (off by default since issue 25): customers' thumbs-ups are what makes each curation
    # read and write while they vote, so the load tests see new snapshots mid-load.
    cfg = curate.CurateConfig(min_train_examples=4, warn_train_examples=4, include_thumbs_up=True)
    first = curate.main(cfg, db)
    print("ready", first.version, flush=True)
    summary = {"imported": imported, "curations": 1, "snapshots": [first.version], "adapter": None, "errors": []}
    deadline = time.monotonic() + seconds
    if tiny_model:
        from trainer.config import TrainConfig
        from trainer.train import train_in_subprocess

        train = TrainConfig(base_model=tiny_model, dataset=first.path, device="cpu", max_steps=2, batch_size=4,
                            min_train_examples=4, progress=False)
        summary["adapter"] = train_in_subprocess(train, timeout=max(60.0, seconds * 4)).adapter
    for attempt in range(1000):  # bounded; the deadline ends it first, after at least one more curation
        if attempt and time.monotonic() >= deadline:
            break
        try:
            result = curate.main(cfg, db)
        except Exception as exc:  # reported to the test, which fails on any
            summary["errors"].append(f"{type(exc).__name__}: {exc}")
            break
        summary["curations"] += 1
        if not result.unchanged:
            summary["snapshots"].append(result.version)
        time.sleep(0.3)
    return summary


def promote(snapshot: str, candidate: str, pause: str) -> None:
    from tuneloop import pipeline

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name != "current.json":
            return real_replace(src, dst, *args, **kwargs)
        if pause == "after":
            real_replace(src, dst, *args, **kwargs)
        print("promoting", flush=True)
        time.sleep(120)  # the test kills this process here
        raise SystemExit("not killed")

    os.replace = replace
    pipeline.train_candidate = lambda train, timeout_s: candidate
    pipeline.evaluate = lambda *args, **kwargs: {"candidate": {"f1": 1.0}, "current": {"f1": 0.0}, "base": {"f1": 0.0}}
    # The real decision record: the next run reads it to close a run killed after the flip.
    pipeline.gating.decide_promotion = lambda *args, **kwargs: pipeline.gating.Decision(True, ["reliability test"])
    pipeline.main(pipeline.RetrainConfig(dataset=snapshot, force=True, review_samples=0, few_shot_k=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("curate-loop")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--train", default="", help="tiny model folder: also train one candidate")
    p = sub.add_parser("promote")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--pause", choices=["before", "after"], required=True)
    args = parser.parse_args(argv)
    if args.mode == "curate-loop":
        print("done", json.dumps(curate_loop(args.seconds, args.examples, args.train)), flush=True)
    else:
        promote(args.snapshot, args.candidate, args.pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
