"""The nightly job's evaluation on each backend: what `tuneloop retrain` spends after training.

The gate scores base, candidate and the few-shot base on the snapshot's test split and measures
general-text perplexity (``tuneloop.pipeline.evaluate``). This times that work with the runner of
each backend (``evals.evaluate.make_runner``), each in a process of its own, on the pack's test
split with a random r=16 LoRA as the candidate (the time does not depend on what the adapter
learnt), and prints seconds per role, label F1 per role, and the ratio. Training itself is the
same PEFT job whatever serves, so this difference is the whole change in retrain time.

    .venv/bin/python benchmarks/gate_eval.py [--limit 0] [--home DIR]

``--home``: an existing ``$TUNELOOP_HOME`` with a snapshot (its current adapter is the candidate,
e.g. after `make demo`); by default a fresh one set up like `tuneloop init`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-bench-gate-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from assistant import paths  # noqa: E402

paths.configure_environment()

BACKENDS = ("transformers", "llama_cpp")


def setup_home() -> None:
    """As `tuneloop init --pack peach_state_bank`: persona, the pack's Q/A, the first snapshot;
    then a random adapter in service as the candidate."""
    from feedback import curate, packs
    from feedback.db import connect
    from serve import make_adapter  # benchmarks/ is this script's folder, first on sys.path

    pack = packs.load_pack("peach_state_bank")
    packs.install_persona(pack)
    db = connect()
    packs.import_pack(db, pack)
    curate.main(curate.CurateConfig(), db)
    make_adapter()


def child(backend_name: str, limit: int) -> dict:
    from assistant import adapters
    from assistant.config import ServeConfig, load
    from evals import evaluate as evaluation
    from evals import gate as gating
    from feedback import datasets

    serve = load(ServeConfig, "serve")
    serve = ServeConfig(**{**serve.__dict__, "backend": backend_name, "device": "cpu"})
    test = evaluation.load_test_set(evaluation.EvalConfig(dataset=str(datasets.latest_snapshot()), limit=limit))
    labeler = evaluation.labeler_for(test)
    texts = gating.general_texts(gating.GateConfig())
    started = time.perf_counter()
    runner = evaluation.make_runner(serve)
    seconds = {"load": time.perf_counter() - started}
    f1 = {}
    candidate = adapters.current_version()
    for role, adapter, shots in (("base", None, None), ("candidate", candidate, None),
                                 ("few_shot", None, evaluation.few_shot_examples(test.train, 3, 0))):
        started = time.perf_counter()
        report = evaluation.evaluate(runner, test, adapter, serve, labeler, shots, 16, None if shots else texts)
        seconds[role] = time.perf_counter() - started
        f1[role] = report.f1
    return {"backend": backend_name, "n": len(test.examples), "candidate": candidate,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_s": round(sum(seconds.values()), 1),
            "label_f1": {k: round(v, 4) for k, v in f1.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="test questions (default 0: the whole test split)")
    parser.add_argument("--home", help="an existing TUNELOOP_HOME with a snapshot and an adapter in service")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.limit)), flush=True)
        return
    if not args.home:
        setup_home()
    env = {**os.environ, "TUNELOOP_HOME": args.home or os.environ["TUNELOOP_HOME"]}
    results = {}
    for name in BACKENDS:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--limit", str(args.limit)],
                              env=env, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
        print(json.dumps(results[name]), flush=True)
    hf, llama = results["transformers"], results["llama_cpp"]
    print(json.dumps({"evaluation_speedup": round(hf["total_s"] / llama["total_s"], 2),
                      "label_f1_difference": {k: round(llama["label_f1"][k] - hf["label_f1"][k], 4) for k in hf["label_f1"]}}))


if __name__ == "__main__":
    main()
