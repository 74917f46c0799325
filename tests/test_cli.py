"""The command line: every command has help and is in the README; status and ask as documented."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop import cli

REPO = Path(__file__).resolve().parents[1]


def all_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = prefix + (name,)
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    yield from all_commands(sub, path)
                else:
                    yield path, sub


def test_every_command_has_help_and_is_in_the_readme_and_the_cli_page():
    """The README's short command list and docs/cli.md (options and examples) each name every command."""
    pages = {name: (REPO / name).read_text(encoding="utf-8") for name in ("README.md", "docs/cli.md")}
    commands = list(all_commands(cli.build_parser()))
    assert len(commands) >= 4
    for path, sub in commands:
        assert sub.description and len(sub.description) > 10, f"{' '.join(path)} has no help text"
        for name, text in pages.items():
            assert f"tuneloop {' '.join(path)}" in text, f"`tuneloop {' '.join(path)}` is missing from {name}"


def test_help_runs_for_each_command(capsys):
    for path, _ in all_commands(cli.build_parser()):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: tuneloop" in capsys.readouterr().out


def test_status_json_on_a_fresh_home(tuneloop_home, capsys):
    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["quantization"] == "nf4"
    assert status["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert status["current_adapter"] is None
    assert status["home"] == str(tuneloop_home.resolve())


def test_config_errors_exit_2_with_a_message(tuneloop_home, capsys):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    (tuneloop_home / "config.toml").write_text("[serve]\nquantization = 'int3'\n")
    assert cli.main(["status", "--json"]) == 2
    assert "quantization must be" in capsys.readouterr().err


def test_ask_json_with_the_tiny_model(tiny_model_dir, capsys):
    code = cli.main(["ask", "What is a lien?", "--json", "--base-model", str(tiny_model_dir), "--max-new-tokens", "5"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"answer", "adapter", "latency_s", "tokens_in", "tokens_out"}
    assert result["adapter"] is None and result["tokens_out"] > 0

    from feedback.db import connect

    row = next(connect()["turns"].rows)
    assert row["question"] == "What is a lien?" and row["status"] == "complete"


def test_ask_refuses_oversized_question(tiny_model_dir, capsys):
    code = cli.main(["ask", "x" * 5000, "--base-model", str(tiny_model_dir)])
    assert code == 2
    assert "limit is 2000" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_ask_on_a_fresh_home_with_the_default_model(tuneloop_home):
    exe = Path(sys.executable).with_name("tuneloop")
    out = subprocess.run([str(exe), "ask", "What is a lien?", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["answer"] and result["adapter"] is None
    assert (tuneloop_home / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
