"""The nightly retrain job: curate, train, evaluate, gate, promote.

``tuneloop retrain`` (or :func:`main` from Python) runs it once:

1. **curate** the feedback into a dataset snapshot (or use ``--dataset``); a snapshot this job
   already finished a run on means no new data, and the job stops there unless ``--force``;
2. **train** a candidate adapter in a child process (a 4-bit base that ran inference must never be
   trained, and a crash there cannot take this process down);
3. **evaluate** the candidate, the adapter in service and the base model (plus a few-shot prompt of
   the base) on the frozen test split, in the served configuration, with general-text perplexity;
4. **gate**: :func:`evals.gate.decide_promotion`, stored with its reasons whatever it says;
5. **promote**: flip ``adapters/current.json`` atomically; a running server picks it up on its next
   request.

A lock file keeps two runs from overlapping; the kernel drops it when its holder dies, so a run
killed with ``kill -9`` never blocks the next one. Every run is a ``retrain_runs`` row (running ->
done, noop or failed); a row left "running" by a dead process is marked failed by the next run. The
pointer only changes in step 5, in one ``os.replace``, so a kill at any point leaves the adapter in
service serving. This is the only module that imports every package.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from assistant import adapters, paths, progress
from assistant.config import ServeConfig, add_arguments, check, from_args, load
from evals import evaluate as evaluation
from evals import gate as gating
from evals import report as reporting
from evals import review, schema
from trainer.config import TrainConfig, resolve_configs

log = logging.getLogger(__name__)

LOCK_FILE = "retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock; the message names its pid."""


@dataclass
class RetrainConfig:
    force: bool = False
    """Train even when the snapshot holds nothing new since the last finished run."""
    dataset: str = ""
    """Use this snapshot folder instead of curating a new one."""
    limit: int = 0
    """Evaluate on the first N test examples only; 0 = the whole test split."""
    batch_size: int = 16
    """Questions generated together during evaluation."""
    few_shot_k: int = 3
    """Training examples in the prompt of the few-shot baseline; 0 = skip that baseline."""
    review_samples: int = 20
    """Test questions put up for blind side-by-side staff review of current vs candidate; 0 = none."""
    train_timeout_s: float = 0.0
    """Stop training after this many seconds (the run fails, nothing is promoted); 0 = no limit."""
    seed: int = 0
    """Seed of few-shot choice and review sampling."""
    nice: int = 10
    """How far tuneloop retrain lowers its own CPU priority (nice; its training process inherits it), so a server on the same machine answers customers first; 0 = unchanged; applied by the command, not by main()."""

    def __post_init__(self) -> None:
        check(self.limit >= 0, "limit must be 0 (all test examples) or positive")
        check(1 <= self.batch_size <= 512, "batch_size must be between 1 and 512")
        check(0 <= self.few_shot_k <= 32, "few_shot_k must be between 0 and 32")
        check(self.review_samples >= 0, "review_samples must be 0 (no review) or positive")
        check(self.train_timeout_s >= 0, "train_timeout_s must be 0 (no limit) or positive")
        check(0 <= self.nice <= 19, "nice must be between 0 (unchanged) and 19 (lowest CPU priority)")


def main(
    cfg: RetrainConfig,
    train: TrainConfig | None = None,
    gate: gating.GateConfig | None = None,
    serve: ServeConfig | None = None,
) -> dict:
    """Run curate, train, evaluate, gate, promote once; returns the run's summary.

    ``train``, ``gate`` and ``serve`` default to the ``[train]``, ``[gate]`` and ``[serve]`` config;
    train and serve are resolved together once (:func:`trainer.config.resolve_configs`), and the
    candidate is trained and evaluated on exactly those values.
    Raises :class:`RetrainBusy` when another run holds the lock; any failure is recorded and re-raised.
    """
    started = time.perf_counter()
    train, serve = resolve_configs(train, serve)
    gate = gate or load(gating.GateConfig, "gate")
    with retrain_lock():
        db = schema.connect()
        interrupted = mark_interrupted_runs(db)
        run_id = start_run(db, cfg, train, gate, serve)
        try:
            expired = expire(db, run_id)
            snapshot, dataset_sha = curate(db, run_id, cfg)
            if not cfg.force and finished_on(db, dataset_sha):
                return finish(db, run_id, started, "noop", dataset=snapshot.name, interrupted=interrupted,
                              expired_turns=expired, reasons=[f"no new data: a finished run already used snapshot {snapshot.name}; --force retrains"])

            set_stage(db, run_id, "train")
            train = dataclasses.replace(train, dataset=str(snapshot), **forgetting_settings(train, gate))
            candidate = train_candidate(train, cfg.train_timeout_s)
            db["retrain_runs"].update(run_id, {"candidate": candidate})

            set_stage(db, run_id, "evaluate")
            incumbent = adapters.current_version()
            reports = evaluate(db, run_id, cfg, gate, serve, snapshot, candidate, incumbent)

            set_stage(db, run_id, "gate")
            decision = gating.decide_promotion(reports["candidate"], reports["current" if incumbent else "base"], gate,
                                               base=reports["base"])
            gating.record_decision(db, decision, candidate, incumbent, gate, run_id)
            if cfg.review_samples:
                review.create_batch(db, reports["candidate"], reports["current" if incumbent else "base"],
                                    cfg.review_samples, cfg.seed, batch=f"run{run_id}")

            set_stage(db, run_id, "promote")
            if decision.promote:
                adapters.set_current(candidate, f"retrain run {run_id}: " + "; ".join(decision.reasons))
            result = finish(
                db, run_id, started, "done", dataset=snapshot.name, interrupted=interrupted, expired_turns=expired,
                candidate=candidate,
                incumbent=incumbent, promoted=decision.promote, reasons=decision.reasons,
                f1={role: (r.f1 if r else None) for role, r in
                    {"base": reports["base"], "current": reports.get("current"), "candidate": reports["candidate"],
                     "few_shot": reports.get("few_shot")}.items()},
            )
        except BaseException as exc:
            db["retrain_runs"].update(run_id, {
                "status": "failed", "error": f"{type(exc).__name__}: {exc}", "finished_at": _now(),
                "seconds": round(time.perf_counter() - started, 2),
            })
            raise
    reporting.main(reporting.ReportConfig())
    return result


# --- the steps -----------------------------------------------------------------------------------


def expire(db, run_id: int) -> int:
    """Erase the turns past [privacy] keep_days before curating, so no snapshot takes them (feedback.privacy)."""
    from feedback import privacy

    set_stage(db, run_id, "expire")
    return privacy.expire(db)


def curate(db, run_id: int, cfg: RetrainConfig) -> tuple[Path, str]:
    """The snapshot to train on (curated now unless ``cfg.dataset``) and its manifest hash."""
    set_stage(db, run_id, "curate")
    if cfg.dataset:
        snapshot = Path(cfg.dataset).expanduser().resolve()
    else:
        from feedback.curate import CurateConfig
        from feedback.curate import main as curate_main

        snapshot = Path(curate_main(load(CurateConfig, "curate"), db).path)
    manifest = snapshot / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{snapshot} is not a dataset snapshot: manifest.json is missing")
    sha = paths.sha256_file(manifest)
    db["retrain_runs"].update(run_id, {"dataset": snapshot.name, "dataset_sha256": sha})
    return snapshot, sha


def forgetting_settings(train: TrainConfig, gate: gating.GateConfig) -> dict:
    """Have training keep only weights the gate's forgetting check could pass: perplexity measured
    at every validation on the gate's general text after the passages the gate itself checks (so
    the check stays on text training never chose by), against the gate's bar."""
    if train.general_text:
        return {}  # set by the operator in [train]
    passages = gating.general_passages(gate)
    if len(passages) <= gate.general_limit:
        log.warning("%s has no passages beyond the gate's %d; training runs without a forgetting curve",
                    gating.general_file(gate), gate.general_limit)
        return {}
    return {"general_text": str(gating.general_file(gate)), "general_skip": gate.general_limit,
            "max_perplexity_ratio": train.max_perplexity_ratio or gate.max_perplexity_ratio}


def train_candidate(train: TrainConfig, timeout_s: float) -> str:
    """Train in a child process; returns the new adapter version."""
    # Imported here: trainer.train loads torch, and `tuneloop --help` builds this module's parser.
    from trainer.train import train_in_subprocess

    return train_in_subprocess(train, timeout=timeout_s or None).adapter


def evaluate(db, run_id: int, cfg: RetrainConfig, gate: gating.GateConfig, serve: ServeConfig, snapshot: Path,
             candidate: str, incumbent: str | None) -> dict[str, evaluation.EvalReport]:
    """Reports of base, current (when one serves), candidate and few-shot base on the test split, each
    with the references serving gives it, found among the snapshot's train rows and the catalog
    (one index for all, :class:`evals.evaluate.EvalIndex`; the few-shot prompt holds its shots instead)."""
    test = evaluation.load_test_set(evaluation.EvalConfig(dataset=str(snapshot), limit=cfg.limit))
    labeler = evaluation.labeler_for(test)
    texts = gating.general_texts(gate)
    runner = evaluation.make_runner(serve)
    systems = {"base": None, "candidate": candidate}
    if incumbent:
        systems["current"] = incumbent
    reports = {role: evaluation.evaluate(runner, test, adapter, serve, labeler, None, cfg.batch_size, texts)
               for role, adapter in systems.items()}
    if cfg.few_shot_k:
        shots = evaluation.few_shot_examples(test.train, cfg.few_shot_k, cfg.seed)
        reports["few_shot"] = evaluation.evaluate(runner, test, None, serve, labeler, shots, cfg.batch_size)
    for role, report in reports.items():
        evaluation.record_report(db, report, role, run_id)
    paths.write_json_atomic(adapters.adapter_path(candidate) / "eval_report.json",
                            {role: r.to_json(examples=False) for role, r in reports.items()})
    return reports


# --- bookkeeping ---------------------------------------------------------------------------------


@contextmanager
def retrain_lock():
    """Hold ``$TUNELOOP_HOME/runs/retrain.lock`` for the run; raise :class:`RetrainBusy` if held.

    ``flock`` is released by the kernel when its holder dies, so a lock file left by a killed run
    (its pid no longer alive) is simply taken over.
    """
    file = paths.runs_dir() / LOCK_FILE
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise RetrainBusy(f"another retrain is running ({holder}); wait for it or stop that process") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("recovered a stale retrain lock (%s): its process is gone", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {_now()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def mark_interrupted_runs(db) -> list[int]:
    """Runs left "running" by a process that died (we hold the lock, so none is really running).

    A run killed between its pointer flip and its final update did promote: the pointer names its
    candidate and its own run, and its gate decision is stored. It is recorded as done, so the next
    run does not retrain the same snapshot; every other interrupted run is recorded as failed.
    """
    stale = list(db["retrain_runs"].rows_where("status = 'running'"))
    pointer = adapters.read_pointer()
    for row in stale:
        flipped = (row["stage"] == "promote" and row["candidate"] and pointer.get("version") == row["candidate"]
                   and str(pointer.get("reason", "")).startswith(f"retrain run {row['id']}:"))
        decision = next(db["gate_decisions"].rows_where("run_id = ? and promote = 1", [row["id"]]), None) if flipped else None
        if decision:
            db["retrain_runs"].update(row["id"], {
                "status": "done", "stage": "end", "promoted": 1, "finished_at": _now(), "reasons": decision["reasons"],
                "error": "interrupted after the promotion; recorded by the next run"})
        else:
            db["retrain_runs"].update(row["id"], {"status": "failed", "finished_at": _now(),
                                                  "error": "interrupted: the process died before the run finished"})
    for folder in paths.remove_stale_staging():
        log.warning("removed %s, left half-written by a killed process", folder)
    return [row["id"] for row in stale]


def start_run(db, cfg: RetrainConfig, train: TrainConfig, gate: gating.GateConfig, serve: ServeConfig) -> int:
    resolved = {"retrain": dataclasses.asdict(cfg), "train": dataclasses.asdict(train),
                "gate": dataclasses.asdict(gate), "serve": dataclasses.asdict(serve)}
    run_id = db["retrain_runs"].insert({
        "status": "running", "stage": "start", "pid": os.getpid(), "started_at": _now(),
        "incumbent": adapters.current_version(), "config": json.dumps(resolved),
    }).last_pk
    paths.write_json_atomic(paths.runs_dir() / f"retrain-{run_id}" / "config.json", resolved)
    return run_id


RETRAIN_STAGES = {
    "expire": "erasing turns past the retention period",
    "curate": "curating the dataset snapshot",
    "train": "training a candidate adapter",
    "evaluate": "evaluating the candidate, the adapter in service (if any) and the base model on the test set",
    "gate": "deciding whether the candidate is better (the promotion gate)",
    "promote": "promoting the candidate if the gate passed it",
}
"""The stages of a run in order, as ``tuneloop retrain`` shows them."""


def set_stage(db, run_id: int, stage: str) -> None:
    """Record the stage the run is in, and show it under ``tuneloop retrain`` (the nightly job's log)."""
    log.info("retrain run %s: %s", run_id, stage)
    db["retrain_runs"].update(run_id, {"stage": stage})
    shown = progress.current()
    if shown is not None:
        shown.start(RETRAIN_STAGES[stage])


def finished_on(db, dataset_sha: str) -> bool:
    """Whether a finished run (promoted or not) already trained on this exact snapshot."""
    return db["retrain_runs"].count_where("status = 'done' and dataset_sha256 = ?", [dataset_sha]) > 0


def finish(db, run_id: int, started: float, status: str, *, dataset: str, interrupted: list[int],
           expired_turns: int = 0, candidate: str | None = None, incumbent: str | None = None, promoted: bool = False,
           reasons: list[str] | None = None, f1: dict | None = None) -> dict:
    seconds = round(time.perf_counter() - started, 2)
    result = {
        "run": run_id, "status": status, "dataset": dataset, "candidate": candidate, "incumbent": incumbent,
        "promoted": promoted, "reasons": reasons or [], "f1": f1 or {}, "seconds": seconds,
        "interrupted_runs": interrupted, "expired_turns": expired_turns,
    }
    db["retrain_runs"].update(run_id, {
        "status": status, "stage": "end", "finished_at": _now(), "promoted": int(promoted),
        "reasons": json.dumps(result["reasons"]), "f1": json.dumps(result["f1"]), "seconds": seconds,
    })
    paths.write_json_atomic(paths.runs_dir() / f"retrain-{run_id}" / "result.json", result)
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- command line --------------------------------------------------------------------------------


def lower_cpu_priority(increment: int) -> int:
    """Raise this process's niceness by ``increment`` (capped at 19), on every thread it already has.

    On Linux a priority belongs to a thread, and new threads (torch's, and any child process)
    inherit their creator's; imports have already started some, so each one listed in
    ``/proc/self/task`` is lowered, not only the calling thread as ``os.nice`` would. Elsewhere
    ``os.nice`` lowers the whole process. Returns the niceness now in effect.
    """
    if increment <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return os.nice(increment)
    for tid in map(int, os.listdir(tasks)):
        try:  # each thread from its own niceness: only ever lowered, which needs no privilege
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except ProcessLookupError:  # the thread ended since the listing
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def cmd_retrain(args) -> int:
    """Curate, train, evaluate, gate, promote: the nightly job (exit 0 whether promoted or not)."""
    cfg = from_args(RetrainConfig, "retrain", args, {"force": True if args.force else None})
    train, serve = resolve_configs(load(TrainConfig, "train", {
        "max_steps": args.train_max_steps, "epochs": args.train_epochs, "lr": args.train_lr,
        "method": args.train_method, "replay": args.train_replay}))
    lower_cpu_priority(cfg.nice)
    try:
        with progress.StageProgress("tuneloop retrain", len(RETRAIN_STAGES)):  # each set_stage() starts one
            result = main(cfg, train, serve=serve)
    except RetrainBusy as exc:
        print(f"tuneloop retrain: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # already recorded as a failed run; reported here with its type
        print(f"tuneloop retrain: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["expired_turns"]:
        print(f"{result['expired_turns']} turn(s) older than [privacy] keep_days erased")
    if result["status"] == "noop":
        print(f"nothing to do: {result['reasons'][0]}")
    else:
        print(f"candidate {result['candidate']} {'PROMOTED' if result['promoted'] else 'rejected'} in {result['seconds']:.0f} s")
        for reason in result["reasons"]:
            print(f"  {reason}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help=cmd_retrain.__doc__, description=cmd_retrain.__doc__)
    add_arguments(p, RetrainConfig, skip=("force",))
    p.add_argument("--force", action="store_true", help="train even when there is no new data")
    p.add_argument("--max-steps", dest="train_max_steps", metavar="N", help="training: stop after N optimizer steps")
    p.add_argument("--epochs", dest="train_epochs", metavar="E", help="training: passes over the training split")
    p.add_argument("--lr", dest="train_lr", metavar="LR", help="training: peak learning rate")
    p.add_argument("--method", dest="train_method", metavar="M", help="training: qlora, lora or full")
    p.add_argument("--replay", dest="train_replay", metavar="R",
                   help="training: rows of base-model text per training example, against forgetting (0 = none)")
    p.add_argument("--json", action="store_true",
                   help="print candidate, promoted, reasons, f1 (base, current, candidate), seconds as JSON")
    p.set_defaults(handler=cmd_retrain)
