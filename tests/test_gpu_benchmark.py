"""benchmarks/gpu.py in its tiny mode, on the CPU: the GPU benchmark's code keeps working where no GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_tiny_mode_prints_every_variant_and_both_generation_engines(tuneloop_home):
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--steps", "2", "--examples", "24",
         "--questions", "4", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    rows = {row["variant"]: row for row in result["training"]}
    assert set(rows) == {"hf-trainer", "plain-loop", "tuneloop-cpu-settings", "tuneloop"}
    assert all(row["steps"] == 2 and row["examples_per_s"] > 0 for row in rows.values())
    assert rows["hf-trainer"]["vs_hf_trainer"] == 1.0
    # On a CPU the device defaults are the CPU settings, resolved and printed as such.
    assert (rows["tuneloop"]["share_prefix"], rows["tuneloop"]["group_by_length"]) == ("on", "on")
    generation = result["generation"]
    assert generation["same_answers"] == generation["questions"] == 4
    assert generation["padded"]["tokens"] == generation["continuous"]["tokens"] > 0
    assert result["device"] == "cpu" and result["machine"]["gpu"] is None
