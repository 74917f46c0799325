"""How the real ``tuneloop`` command fails and helps (issue 26): each error is one line on stderr with
a non-zero exit, the traceback only with --debug; --help is plain text with each command's own
options and examples; ``status`` and ``demo`` on a home never set up. Each test runs the command in
a subprocess, as a user would, on the test's own $TUNELOOP_HOME."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing
from importlib import metadata
from pathlib import Path

import pytest

from tuneloop import cli

EMPTY_QUESTION = "tuneloop ask: the question is empty: give it in quotes, or '-' to read it from stdin\n"


def tuneloop(*argv: str, stdin: str | None = "", timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -m tuneloop ARGV`` in a new session (no terminal to prompt on), from a neutral folder."""
    return subprocess.run([sys.executable, "-P", "-m", "tuneloop", *argv], input=stdin, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True, cwd=Path(os.environ["TUNELOOP_HOME"]).parent,
                          **kwargs)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_version_prints_the_installed_version():
    out = tuneloop("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"tuneloop {metadata.version('tuneloop')}\n", "")


@pytest.mark.parametrize("argv, stdin", [(["ask", ""], ""), (["ask", " \t\n "], ""), (["ask", "-"], "  \n\n")])
def test_ask_refuses_an_empty_question_before_loading_the_model(argv, stdin, tuneloop_home):
    out = tuneloop(*argv, stdin=stdin)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", EMPTY_QUESTION)
    # Nothing was prepared, loaded or logged: no model folder, no database.
    assert files_under(tuneloop_home) == []


def test_ask_dash_reads_the_question_from_stdin(tiny_model_dir, tuneloop_home):
    out = tuneloop("ask", "-", "--json", "--base-model", str(tiny_model_dir), "--backend", "transformers",
                   "--quantization", "none", "--max-new-tokens", "3", stdin="What is a lien?\n", timeout=600)
    assert out.returncode == 0, out.stderr
    from feedback.db import connect

    assert [row["question"] for row in connect()["turns"].rows] == ["What is a lien?"]


def test_staff_add_without_a_terminal_or_a_password_on_stdin_explains(tuneloop_home):
    out = tuneloop("staff", "add", "bob")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("tuneloop staff add: no terminal to type the password on; pipe it as the first line of "
                          "stdin with --password-stdin\n")
    out = tuneloop("staff", "add", "bob", "--password-stdin", stdin="")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("tuneloop staff add: no password on stdin; give it as the first line, e.g. "
                          "printf '%s\\n' \"$PASSWORD\" | tuneloop staff add bob --password-stdin\n")
    assert not (tuneloop_home / "feedback.db").exists()  # no user, not even a database, was made


def test_an_expected_error_is_one_line_and_exit_2(tuneloop_home):
    tuneloop_home.mkdir(parents=True)
    (tuneloop_home / "config.toml").write_text("[serve]\nquantization = 'int3'\n")
    out = tuneloop("config", "show")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "tuneloop config show: configuration error: quantization must be 'nf4' or 'none', not 'int3'\n"


def corrupt_database(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "feedback.db").write_bytes(b"this is not a SQLite database" * 100)


def test_an_unexpected_error_is_one_line_and_exit_1(tuneloop_home):
    corrupt_database(tuneloop_home)
    out = tuneloop("feedback", "stats")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == ("tuneloop: error: DatabaseError: file is not a database "
                          "(run with --debug for the traceback)\n")


def test_debug_shows_the_traceback(tuneloop_home):
    corrupt_database(tuneloop_home)
    out = tuneloop("--debug", "feedback", "stats")
    assert out.returncode == 1
    assert out.stderr.startswith("Traceback (most recent call last):\n")
    assert out.stderr.rstrip().endswith("sqlite3.DatabaseError: file is not a database")


def all_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_commands(sub, path + (name,))
    if path and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        yield path, parser


def bool_fields() -> set[str]:
    """Every bool field of a job config: each must be a --flag / --no-flag, never --flag VALUE."""
    from assistant.config import ServeConfig
    from evals.evaluate import EvalConfig
    from evals.report import ReportConfig
    from feedback.curate import CurateConfig
    from feedback.examples import ImportConfig
    from trainer.config import TrainConfig
    from tuneloop.pipeline import RetrainConfig

    configs = (ServeConfig, EvalConfig, ReportConfig, CurateConfig, ImportConfig, TrainConfig, RetrainConfig)
    return {f.name for cls in configs for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is bool}


def test_every_help_example_is_a_command_line_the_parser_accepts():
    # An example that names an option the command lacks would teach the wrong thing.
    import shlex

    parser = cli.build_parser()
    for name, examples in cli.EXAMPLES.items():
        for example in examples:
            command = example.split("|")[-1].split(">")[0].strip()  # the tuneloop part of a pipeline
            argv = shlex.split(command)
            assert argv[0] == "tuneloop" and " ".join(argv[1:]).startswith(name), example
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                raise AssertionError(f"the example {example!r} of `tuneloop {name} --help` does not parse") from None


def test_help_is_plain_text_with_flags_and_examples():
    booleans = bool_fields()
    assert "verbatim" in booleans and "progress" in booleans
    commands = list(all_commands(cli.build_parser()))
    assert len(commands) >= 30
    for path, parser in commands:
        name = " ".join(path)
        text = parser.format_help()
        assert not re.search(r"``|:[a-z]+:`", text), f"`tuneloop {name} --help` shows docstring markup"
        for action in parser._actions:
            if action.dest in booleans and action.option_strings:
                assert action.nargs == 0, f"`tuneloop {name} {action.option_strings[0]}` takes a value"
        examples = text.split("\nexamples:\n")
        assert len(examples) == 2, f"`tuneloop {name} --help` has no examples"
        assert all(line.startswith(f"  tuneloop {name}") or f"| tuneloop {name}" in line
                   for line in examples[1].strip("\n").splitlines()), examples[1]

    # The real command, and only each command's own options.
    out = tuneloop("model", "prepare", "--help")
    assert out.returncode == 0
    assert re.findall(r"^  (-[-\w]+)", out.stdout, re.M) == ["-h", "--json", "--base-model"]
    assert "\nexamples:\n  tuneloop model prepare\n" in out.stdout
    ask = dict(commands)[("ask",)].format_help()
    assert "[--verbatim | --no-verbatim]" in ask
    for serving_only in ("--title", "--welcome", "--port", "--host", "--drain-s", "--log-format", "--max-history-turns"):
        assert serving_only not in ask


def test_status_on_an_uninitialised_home_writes_nothing(tuneloop_home):
    out = tuneloop("status", "--json")
    assert (out.returncode, out.stderr) == (0, "")
    assert json.loads(out.stdout)["initialised"] is False
    assert files_under(tuneloop_home) == []  # neither a database nor a folder under the home
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    out = tuneloop("status")
    assert out.returncode == 0 and "\nnot initialised: run tuneloop init" in out.stdout
    assert list(tuneloop_home.iterdir()) == []


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # init imports and embeds the pack, then the server starts: 46 to 105 s on these 2 shared cores
def test_demo_without_init_says_so_and_runs_init_first(tiny_model_dir, tuneloop_home):
    server = subprocess.Popen(
        [sys.executable, "-P", "-m", "tuneloop", "demo", "--no-retrain", "--port", str(free_port()),
         "--base-model", str(tiny_model_dir), "--backend", "transformers", "--quantization", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        cwd=tuneloop_home.parent)
    lines = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("tuneloop: serving"):
                break
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, "".join(lines) + err
    assert lines[0] == (f"tuneloop demo: {tuneloop_home.resolve()} is not set up yet, so running `tuneloop init --pack "
                        "peach_state_bank` first: it prepares the model, imports the pack's examples, installs its "
                        "persona and curates the first dataset\n")
    assert lines[1].startswith(f"tuneloop home {tuneloop_home.resolve()}: Peach State Bank pack,")
    assert lines[-1].startswith("tuneloop: serving")
    from assistant.config import DEFAULT_SYSTEM_PROMPT, ServeConfig, load

    assert load(ServeConfig, "serve").system_prompt != DEFAULT_SYSTEM_PROMPT  # the pack's persona serves
    assert "tuneloop init: preparing the model" in err and "tuneloop init: curating the first dataset (3/4)" in err


STAGES = """
from assistant.progress import StageProgress
with StageProgress("tuneloop init", 2) as progress:
    progress.start("preparing the model")
    progress.start("importing the pack")
"""


def test_long_steps_show_one_line_per_stage_in_a_log_and_a_bar_on_a_terminal(tmp_path):
    out = subprocess.run([sys.executable, "-P", "-c", STAGES], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "")
    assert out.stderr == "tuneloop init: preparing the model (1/2)\ntuneloop init: importing the pack (2/2)\n"

    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    with open(tmp_path / "stdout", "w") as stdout:
        child = subprocess.run([sys.executable, "-P", "-c", STAGES], stdout=stdout, stderr=follower, timeout=120)
    shown = b""
    while select.select([leader], [], [], 0.5)[0]:  # the terminal keeps what the child wrote until read
        shown += os.read(leader, 4096)
    os.close(follower)
    os.close(leader)
    assert child.returncode == 0
    # tqdm redraws one line with carriage returns: the stage, and a count out of the total.
    assert b"\r" in shown and b"tuneloop init: importing the pack" in shown and b"1/2" in shown
