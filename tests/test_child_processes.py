"""Child processes cannot be hijacked from the working directory.

``python -m NAME`` puts the working directory first on ``sys.path``; a ``cli.py``, ``pipeline.py``,
``tuneloop/`` or ``trainer/`` where a user (or cron) runs ``tuneloop demo`` or ``tuneloop retrain``
would run instead of ours. Each decoy here leaves a marker file when imported.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from trainer.config import TrainConfig

DECOY = "from pathlib import Path\nPath(__file__).resolve().parent.joinpath('HIJACKED').touch()\n"


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cwd"
    for name in ("cli.py", "pipeline.py", "app.py", "tuneloop/__init__.py", "tuneloop/cli.py",
                 "trainer/__init__.py", "trainer/train.py", "trainer/config.py", "assistant/__init__.py",
                 "evals/__init__.py", "feedback/__init__.py"):
        file = folder / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(DECOY, encoding="utf-8")
    return folder


def hijacked(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("HIJACKED"))


def test_demo_retrain_child_runs_our_code_from_a_hostile_directory(hostile_dir, tuneloop_home):
    from tuneloop import cli

    # On an empty home the retrain stops at curation with our own message: our code ran, end to end
    # through the pipeline and its imports of every package.
    out = subprocess.run(cli.demo_retrain_command(1.0), cwd=hostile_dir, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TUNELOOP_HOME": str(tuneloop_home)})
    assert hijacked(hostile_dir) == []
    assert "tuneloop retrain: failed:" in out.stderr, out.stderr
    assert out.returncode == 1


def test_training_child_runs_our_trainer_from_a_hostile_directory(hostile_dir, tmp_path, monkeypatch):
    from trainer import data
    from trainer.train import train_in_subprocess

    monkeypatch.chdir(hostile_dir)
    missing = tmp_path / "no-such-snapshot"
    with pytest.raises(data.DatasetError, match="no-such-snapshot"):
        train_in_subprocess(TrainConfig(dataset=str(missing), base_model="unused", progress=False), timeout=300)
    assert hijacked(hostile_dir) == []
