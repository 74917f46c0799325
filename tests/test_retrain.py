"""The nightly job: the lock, no-op without new data, and kill -9 during training followed by a
run that recovers and promotes (tiny model, snapshot written directly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneloop import pipeline
from assistant import adapters, paths
from evals import schema
from evals.gate import GateConfig
from test_evals import write_config, write_snapshot

REPO = Path(__file__).resolve().parents[1]


def test_a_second_run_is_refused_while_one_holds_the_lock(tuneloop_home, capsys, monkeypatch):
    from tuneloop import cli

    lowered = []  # the command lowers its CPU priority first; not this test process's
    monkeypatch.setattr(pipeline, "lower_cpu_priority", lowered.append)
    with pipeline.retrain_lock():
        with pytest.raises(pipeline.RetrainBusy, match=f"pid {os.getpid()}"):
            pipeline.main(pipeline.RetrainConfig())
        assert cli.main(["retrain"]) == 3
        assert "another retrain is running" in capsys.readouterr().err
        assert cli.main(["retrain", "--nice", "0"]) == 3
    assert schema.connect()["retrain_runs"].count == 0  # a refused run records nothing
    assert lowered == [10, 0], "`tuneloop retrain` runs at nice 10 unless told otherwise"
    assert cli.main(["retrain", "--nice", "20"]) == 2
    assert "nice must be between 0 (unchanged) and 19" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread priorities are Linux's")
def test_lowering_cpu_priority_reaches_threads_already_running_and_later_children():
    # A thread started before the call (as imports start torch's), the caller, a thread started
    # after, and a child process: all at the lowered priority. os.nice alone would miss the first.
    code = """if True:
        import json, os, subprocess, sys, threading
        from tuneloop import pipeline
        stop = threading.Event()
        early = threading.Thread(target=stop.wait); early.start()
        before = os.getpriority(os.PRIO_PROCESS, 0)
        now = pipeline.lower_cpu_priority(5)
        late = threading.Thread(target=stop.wait); late.start()
        threads = {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")}
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                               capture_output=True, text=True, check=True).stdout
        stop.set()
        print(json.dumps({"before": before, "now": now, "threads": threads, "child": int(child)}))
    """
    result = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    expected = min(19, result["before"] + 5)
    assert result["now"] == expected
    assert len(result["threads"]) >= 3 and set(result["threads"].values()) == {expected}
    assert result["child"] == expected


def test_a_stale_lock_from_a_dead_process_is_recovered(tuneloop_home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (paths.runs_dir() / pipeline.LOCK_FILE).write_text(f"pid {dead.pid} since 2026-01-01T00:00:00Z")
    with pipeline.retrain_lock():
        assert (paths.runs_dir() / pipeline.LOCK_FILE).read_text().startswith(f"pid {os.getpid()}")


def test_no_new_data_is_a_noop(tuneloop_home, monkeypatch):
    snapshot = write_snapshot()
    db = schema.connect()
    db["retrain_runs"].insert({"status": "done", "stage": "end", "pid": 1, "started_at": "2026-01-01T00:00:00Z",
                               "dataset": "d0001", "dataset_sha256": paths.sha256_file(snapshot / "manifest.json")})
    monkeypatch.setattr(pipeline, "train_candidate", lambda *a: pytest.fail("trained without new data"))
    result = pipeline.main(pipeline.RetrainConfig(dataset=str(snapshot)))
    assert result["status"] == "noop" and result["candidate"] is None and not result["promoted"]
    assert "no new data" in result["reasons"][0]
    assert [r["status"] for r in schema.connect()["retrain_runs"].rows] == ["done", "noop"]


def test_half_written_folders_of_killed_writers_are_removed_by_the_next_run(tuneloop_home, monkeypatch):
    snapshot = write_snapshot()
    old_adapter = paths.adapters_dir() / ".v20260101-000000-abcd.partial"
    old_dataset = paths.datasets_dir() / ".d0002.x1y2.tmp"
    fresh_adapter = paths.adapters_dir() / ".v20261128-000000-ef01.partial"  # a writer at work now
    for folder in (old_adapter, old_dataset, fresh_adapter):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    for folder in (old_adapter, old_dataset):
        os.utime(folder, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setattr(pipeline, "train_candidate", lambda *a: pytest.fail("stop after the start of the run"))
    with pytest.raises(pytest.fail.Exception):
        pipeline.main(pipeline.RetrainConfig(dataset=str(snapshot)))
    assert not old_adapter.exists() and not old_dataset.exists()
    assert fresh_adapter.exists()
    assert (paths.datasets_dir() / "d0001").exists() and adapters.list_versions() == []


def test_a_failed_step_marks_the_run_failed(tuneloop_home, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "train_candidate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.main(pipeline.RetrainConfig(dataset=str(write_snapshot())))
    row = next(schema.connect()["retrain_runs"].rows)
    assert row["status"] == "failed" and row["stage"] == "train" and "disk full" in row["error"]


def _wait_for_stage(stage: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the retrain process ended before it reached training"
        db = schema.connect()
        if db["retrain_runs"].count_where("stage = ?", [stage]):
            return
        time.sleep(0.2)
    raise AssertionError(f"the retrain never reached stage {stage!r}")


# Slow tier: a real (tiny) training killed with -9, then a whole recovering run (35 s on 2 cores).
@pytest.mark.slow
def test_kill_during_training_keeps_the_adapter_serving_and_the_next_run_recovers(tiny_model_dir, tuneloop_home):
    from test_assistant import make_adapter

    write_config(tiny_model_dir, "[gate]\ngeneral_limit = 5\n")
    snapshot = write_snapshot()
    serving = make_adapter(tiny_model_dir, seed=5)
    adapters.set_current(serving, "in service before the retrain")

    # A long training run in its own process group, killed with SIGKILL (pipeline and trainer child).
    code = ("from tuneloop import pipeline; import sys; from trainer.config import TrainConfig; "
            f"pipeline.main(pipeline.RetrainConfig(dataset={str(snapshot)!r}), TrainConfig(max_steps=100000, min_train_examples=4, progress=False))")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_stage("train", process)
        time.sleep(3)  # into the trainer child's model load / first steps
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert adapters.current_version() == serving
    assert adapters.list_versions() == [serving]  # no half-written candidate is visible
    killed = next(schema.connect()["retrain_runs"].rows)
    assert killed["status"] == "running" and killed["stage"] == "train"

    # The next run takes over the stale lock, marks the killed run failed and retrains the same
    # snapshot (the killed run never finished on it). A permissive gate makes the promotion certain.
    gate = GateConfig(min_delta=-1.0, max_p_not_better=1.0, max_perplexity_ratio=1e9, general_limit=5)
    result = pipeline.main(pipeline.RetrainConfig(dataset=str(snapshot), review_samples=4), gate=gate)
    assert result["status"] == "done" and result["interrupted_runs"] == [killed["id"]]
    assert result["promoted"] and adapters.current_version() == result["candidate"] != serving
    assert set(result["f1"]) == {"base", "current", "candidate", "few_shot"}
    assert all(0.0 <= value <= 1.0 for value in result["f1"].values())

    db = schema.connect()
    assert [r["status"] for r in db["retrain_runs"].rows] == ["failed", "done"]
    decision = next(db["gate_decisions"].rows)
    assert decision["promote"] == 1 and decision["incumbent"] == serving and len(json.loads(decision["reasons"])) == 4  # gain, noise, forgetting, invented facts
    assert {r["role"] for r in db["eval_reports"].rows} == {"base", "current", "candidate", "few_shot"}
    assert db["review_pairs"].count == 4
    assert (adapters.adapter_path(result["candidate"]) / "eval_report.json").exists()
    assert (paths.reports_dir() / "report.html").exists()

    # Same snapshot again: nothing new, nothing trained; rollback restores the adapter that served before.
    assert pipeline.main(pipeline.RetrainConfig(dataset=str(snapshot)))["status"] == "noop"
    adapters.rollback("test")
    assert adapters.current_version() == serving


def test_training_is_held_to_the_gates_forgetting_bar_on_passages_the_gate_does_not_check(tuneloop_home, tmp_path, caplog):
    from trainer.config import TrainConfig

    gate = GateConfig()
    shipped = pipeline.forgetting_settings(TrainConfig(), gate)
    passages = pipeline.gating.general_passages(gate)
    assert shipped == {"general_text": str(pipeline.gating.general_file(gate)), "general_skip": 40, "max_perplexity_ratio": 1.25}
    assert len(passages) > 40, "the shipped pack leaves passages for training's forgetting curve"
    assert set(passages[40:]).isdisjoint(pipeline.gating.general_texts(gate))
    own = TrainConfig(general_text=str(tmp_path / "mine.txt"), max_perplexity_ratio=2.0)
    assert pipeline.forgetting_settings(own, gate) == {}, "an operator's [train] setting wins"
    short = tmp_path / "short.txt"
    short.write_text("one passage\nanother\n")
    with caplog.at_level("WARNING"):
        assert pipeline.forgetting_settings(TrainConfig(), GateConfig(general_text=str(short))) == {}
    assert "no passages beyond the gate's 40" in caplog.text
