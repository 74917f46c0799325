"""Faults: kill -9 of the server mid-answer and mid-vote, of the nightly job mid-training and
mid-promotion, damaged adapter files, and a full disk while a dataset snapshot is written.

After each: the database passes ``PRAGMA integrity_check``, nothing the server acknowledged is
missing, and the adapter the pointer names is whole and serving."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from assistant import adapters, paths
from assistant.chat import ChatService, TransformersBackend
from assistant.config import ServeConfig
from feedback.db import connect
from reliability_harness import (
    DAMAGES,
    REPO,
    SNAPSHOT_WRITE_POINTS,
    child_env,
    damage,
    integrity_check,
    promotion_kill_round,
    server_kill_round,
    snapshot_full_disk_round,
)

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def serving(tiny_model_dir: Path) -> tuple[TransformersBackend, str]:
    """A freshly started real backend (as after a restart) and the adapter its first answer used."""
    cfg = ServeConfig(base_model=str(tiny_model_dir), device="cpu", max_new_tokens=4)
    backend = TransformersBackend(cfg)
    stream = ChatService(cfg, backend).answer("Is my adapter whole?")
    "".join(stream)
    return backend, stream.stats.adapter


# --- the server ------------------------------------------------------------------------------------


def test_kill9_mid_answer_and_mid_vote_loses_no_acknowledged_row(tuneloop_home):
    facts = server_kill_round(tuneloop_home)
    assert facts["ledger"].votes and facts["killed_mid_answer"], "the kill came before the votes or after the answer"
    assert facts["integrity"] == facts["integrity_after_restart"] == "ok"
    assert facts["lost"] == 0
    # The answer cut off by the kill keeps its question, marked as never finished.
    assert facts["cut_off_status"] == [("streaming",)]
    assert facts["restart_serves"] and facts["rows_added_after_restart"] == (1, 1)


# --- the nightly job -------------------------------------------------------------------------------


@pytest.mark.parametrize("pause", ["before", "after"])
def test_kill9_mid_promotion_leaves_a_whole_adapter_serving(pause, tuneloop_home, tiny_model_dir):
    from tuneloop import pipeline
    from evals import schema
    from test_assistant import make_adapter
    from test_evals import write_snapshot

    old, candidate = make_adapter(tiny_model_dir, seed=1), make_adapter(tiny_model_dir, seed=2)
    adapters.set_current(old, "serving before the retrain")
    facts = promotion_kill_round(tuneloop_home, write_snapshot(), candidate, pause)
    expected = old if pause == "before" else candidate
    assert facts["pointer"] == adapters.read_pointer()["version"] == expected  # old or new, never torn
    backend, answered_on = serving(tiny_model_dir)
    assert (backend.active, answered_on, backend.last_error) == (expected, expected, None)

    db = schema.connect()
    (killed,) = list(db["retrain_runs"].rows)
    assert (killed["status"], killed["stage"]) == ("running", "promote")
    with pipeline.retrain_lock():  # the next run takes the lock of the dead one and closes its run
        assert pipeline.mark_interrupted_runs(db) == [killed["id"]]
    # Killed after the flip, the run did promote: it is closed as done, so the same snapshot is not
    # retrained; killed before it, the run failed.
    closed = db["retrain_runs"].get(killed["id"])
    assert (closed["status"], closed["promoted"]) == (("done", 1) if pause == "after" else ("failed", 0))
    assert integrity_check(paths.feedback_db()) == "ok"


@pytest.mark.slow
def test_kill9_mid_training_leaves_no_half_adapter(tuneloop_home, tiny_model_dir):
    # tests/test_retrain.py kills the whole `tuneloop retrain` during training; this kills the
    # trainer process itself, once its progress bar shows optimizer steps running.
    from test_assistant import make_adapter
    from test_evals import write_snapshot
    from trainer.config import TrainConfig

    serving_before = make_adapter(tiny_model_dir, seed=3)
    adapters.set_current(serving_before, "serving before the retrain")
    config = paths.runs_dir() / "train-config.json"
    train = TrainConfig(base_model=str(tiny_model_dir), dataset=str(write_snapshot()), device="cpu",
                        max_steps=100_000, batch_size=4, min_train_examples=4, progress=True)
    config.write_text(json.dumps(train.__dict__), encoding="utf-8")
    trainer = subprocess.Popen([sys.executable, "-m", "trainer.train", "--config-json", str(config)], cwd=REPO,
                               env=child_env(tuneloop_home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        seen = threading.Event()

        def watch() -> None:
            shown = ""
            for chunk in iter(lambda: trainer.stderr.read(64), ""):
                shown = (shown + chunk)[-4096:]
                if re.search(r"\b[1-9]\d*/100000 ", shown):  # the bar counts a finished optimizer step
                    seen.set()
                    return

        threading.Thread(target=watch, daemon=True).start()
        assert seen.wait(300), "the trainer never started its optimizer steps"
        time.sleep(1)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()

    assert adapters.list_versions() == [serving_before]
    assert adapters.current_version() == serving_before
    backend, answered_on = serving(tiny_model_dir)
    assert (answered_on, backend.last_error) == (serving_before, None)


# --- damaged adapters ------------------------------------------------------------------------------
# tests/test_assistant.py already refuses a pickle, a cut-in-half file, another base's adapter, a
# missing weights file, a broken config and wrong shapes; these are the other ways a file breaks.


# Flipped bits in tensor data load fine (safetensors has no checksum): the weights' sha256 recorded
# in provenance.json at training time is what catches them.
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_adapter_file_is_refused_and_the_previous_keeps_serving(how, tuneloop_home, tiny_model_dir):
    from test_assistant import make_adapter

    good, damaged = make_adapter(tiny_model_dir, seed=4), make_adapter(tiny_model_dir, seed=5)
    adapters.set_current(good, "good")
    cfg = ServeConfig(base_model=str(tiny_model_dir), device="cpu", max_new_tokens=4)
    backend = TransformersBackend(cfg)
    service = ChatService(cfg, backend)
    damage(adapters.adapter_path(damaged) / adapters.WEIGHTS_FILE, how)
    adapters.set_current(damaged, "a promotion of a file damaged on disk")
    stream = service.answer("Which adapter answers?")
    "".join(stream)
    assert stream.stats.adapter == good and backend.active == good
    assert backend.last_error and damaged in backend.last_error


# --- a full disk while a dataset snapshot is written -----------------------------------------------
# tests/test_curate.py fails the manifest write through feedback.curate; here every write point fails.


@pytest.mark.parametrize("fail_at", SNAPSHOT_WRITE_POINTS)
def test_full_disk_mid_snapshot_leaves_the_previous_version_intact(fail_at, tuneloop_home):
    facts = snapshot_full_disk_round(connect(), fail_at)
    assert facts["raised"], "the ENOSPC did not reach the caller"
    assert facts["latest_is_previous"] and facts["previous_unchanged"]
    assert facts["new_entries"] == [] and facts["recorded_unchanged"]  # no half or hidden leftover
    assert facts["retry"] == facts["failing"]  # once there is room, the same version number is written
