"""Long commands show their stages on stderr: one line per stage in a log (and a line about every
tenth of the training steps), a bar with a count on a terminal; stdout keeps only the result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


from assistant import adapters, paths
from test_data import QUESTIONS  # tests/ is on sys.path (pytest rootdir import mode)

REPO = Path(__file__).resolve().parents[1]


def stage_lines(err: str, command: str) -> list[str]:
    """The lines of ``command``'s stages (and of training steps), without library warnings."""
    return [line for line in err.splitlines() if line.startswith((f"{command}: ", "training: "))]


def test_data_import_and_curate_show_their_stages(tmp_path, capsys):
    from tuneloop import cli

    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\n" + "".join(f'"{q}","Answer: {q.lower()}"\n' for q in QUESTIONS), encoding="utf-8")
    assert cli.main(["data", "import", str(faq), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["imported"] == len(QUESTIONS)
    assert stage_lines(err, "tuneloop data import") == [
        "tuneloop data import: reading faq.csv (1/2)",
        f"tuneloop data import: checking {len(QUESTIONS)} rows, embedding new questions and assigning splits (2/2)",
    ]

    assert cli.main(["curate", "--json", "--min-train-examples", "5", "--warn-train-examples", "5"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["version"] == "d0001"
    assert stage_lines(err, "tuneloop curate") == [
        "tuneloop curate: gathering examples and feedback (1/5)",
        "tuneloop curate: removing training questions that match a test question (2/5)",
        "tuneloop curate: merging near-duplicate questions (3/5)",
        "tuneloop curate: comparing with the latest snapshot (4/5)",
        "tuneloop curate: writing snapshot d0001 (5/5)",
    ]
    # Nothing new: the run ends after the comparison; a dry run never counts a writing stage.
    assert cli.main(["curate", "--dry-run", "--min-train-examples", "5", "--warn-train-examples", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("nothing changed since d0001")
    assert stage_lines(err, "tuneloop curate")[-1] == "tuneloop curate: comparing with the latest snapshot (4/4)"

    # Called from Python (as the nightly job and tests call it), curation says nothing.
    from feedback import curate

    curate.main(curate.CurateConfig(min_train_examples=5, warn_train_examples=5))
    assert capsys.readouterr().err == ""


def test_train_shows_its_stages_and_a_line_per_tenth_of_the_steps(tiny_model_dir, capsys):
    from test_trainer import write_snapshot

    import torch

    from tuneloop import cli

    write_snapshot(8, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_trainer.py: a tiny model gains nothing from more threads
    try:
        code = cli.main(["train", "--base-model", str(tiny_model_dir), "--method", "lora", "--max-steps", "2",
                         "--lr", "0.01", "--min-train-examples", "8", "--replay", "0", "--json"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["steps"] == 2  # stdout is the JSON result alone
    lines = stage_lines(err, "tuneloop train")
    assert lines[:4] == [
        "tuneloop train: reading the dataset snapshot (1/5)",
        f"tuneloop train: loading the base model {tiny_model_dir} (2/5)",
        "tuneloop train: encoding the examples with the chat template (3/5)",
        "tuneloop train: training the adapter (lora) (4/5)",
    ]
    # Two steps, one epoch each: a line at each, with the latest loss and the latest validation's,
    # which says when it was measured (before training, then at the end of the first epoch).
    assert [re.sub(r"\d+\.\d+", "X", line) for line in lines[4:6]] == [
        "training: step 1/2 (50%), loss X, val loss X before training",
        "training: step 2/2 (100%), loss X, val loss X at step 1",
    ]
    assert lines[6:] == ["tuneloop train: writing the adapter (5/5)"]
    assert "\r" not in err  # no bar in a log


def test_eval_shows_its_stages(tiny_model_dir, capsys):
    from test_evals import write_config, write_snapshot

    from tuneloop import cli

    write_config(tiny_model_dir)
    write_snapshot()
    assert cli.main(["eval", "--adapter", "base", "--limit", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 4
    assert stage_lines(err, "tuneloop eval") == [
        "tuneloop eval: reading the test set (1/4)",
        f"tuneloop eval: loading the model {tiny_model_dir} (2/4)",
        "tuneloop eval: answering 4 test questions as the base model (3/4)",
        "tuneloop eval: scoring the answers of the base model (4/4)",
    ]


def test_retrain_shows_each_stage_of_the_run(capsys, monkeypatch):
    from test_evals import write_snapshot

    from evals import evaluate
    from tuneloop import cli, pipeline

    def train_candidate(train, timeout_s):  # the stages, not the training, are under test here
        folder = adapters.adapter_path("v-candidate")
        folder.mkdir(parents=True)
        (folder / adapters.WEIGHTS_FILE).write_bytes(b"x")
        return "v-candidate"

    monkeypatch.setattr(pipeline, "train_candidate", train_candidate)
    monkeypatch.setattr(pipeline, "lower_cpu_priority", lambda increment: 0)
    scripted = evaluate.ScriptedRunner(lambda adapter, question: "Happy to help.")
    monkeypatch.setattr(evaluate, "make_runner", lambda serve: scripted)
    snapshot = write_snapshot()
    assert cli.main(["retrain", "--dataset", str(snapshot), "--limit", "4", "--review-samples", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["candidate"] == "v-candidate"
    assert stage_lines(err, "tuneloop retrain") == [
        "tuneloop retrain: erasing turns past the retention period (1/6)",
        "tuneloop retrain: curating the dataset snapshot (2/6)",
        "tuneloop retrain: training a candidate adapter (3/6)",
        "tuneloop retrain: evaluating the candidate, the adapter in service (if any) and the base model on the test "
        "set (4/6)",
        "tuneloop retrain: deciding whether the candidate is better (the promotion gate) (5/6)",
        "tuneloop retrain: promoting the candidate if the gate passed it (6/6)",
    ]


COUNTED_EVAL = """
import time
from assistant import progress
from assistant.config import ServeConfig
from evals import evaluate

def slow(adapter, question):
    time.sleep(0.1)  # longer than tqdm's redraw interval per pair of answers, so the count is drawn
    return "Happy to help."

with progress.on_stderr():
    evaluate.main(evaluate.EvalConfig(adapter="base", dataset=%r, batch_size=2), ServeConfig(),
                  evaluate.ScriptedRunner(slow))
"""


def test_on_a_terminal_eval_draws_a_bar_that_counts_the_questions(tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    questions = tmp_path / "questions.csv"
    questions.write_text("question,answer\n" + "".join(f'"{q}","Answer."\n' for q in QUESTIONS[:4]), encoding="utf-8")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a new pty is 0 columns wide
    with open(tmp_path / "stdout", "w") as stdout:
        child = subprocess.run([sys.executable, "-P", "-c", COUNTED_EVAL % str(questions)], stdout=stdout,
                               stderr=follower, cwd=REPO, env={**os.environ, "TUNELOOP_HOME": str(paths.home())},
                               timeout=300)
    shown = b""
    while select.select([leader], [], [], 0.5)[0]:  # the terminal keeps what the child wrote until read
        shown += os.read(leader, 65536)
    os.close(follower)
    os.close(leader)
    assert child.returncode == 0, shown.decode(errors="replace")
    assert (tmp_path / "stdout").read_text() == ""
    # tqdm redraws one line with carriage returns: the stage, and the questions answered out of 4.
    assert b"\r" in shown and b"answering 4 test questions as the base model (3/4)" in shown
    assert re.search(rb"[24]/4 \[[^\]]*question", shown), shown.decode(errors="replace")
