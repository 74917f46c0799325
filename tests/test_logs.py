"""Issue 32, logs: ``tuneloop serve --log-format json`` writes one JSON object per line, an event per
answered turn with its id, adapter and latency, and no customer text (real `tuneloop serve` process)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx

import app
from assistant import logs
from feedback import api, apikeys
from feedback.db import connect
from test_app import free_port

SERVE_SCRIPTED = textwrap.dedent("""
    import sys
    from assistant import chat
    from tuneloop import cli

    class Base:
        model_id = "scripted-base"

    def make_backend(cfg):
        backend = chat.ScriptedBackend()
        backend.base = Base()
        return backend

    chat.make_backend = make_backend
    sys.exit(cli.main(["serve", "--port", sys.argv[1], "--log-format", "json"]))
""")


def test_json_lines_carry_the_turn_and_no_customer_text(tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(app.__file__))}
    server = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPTED, str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    lines = []
    try:
        # The serving line comes once the signal handlers are about to be installed (after a first
        # run's model preparation): a SIGTERM before it would simply end the process.
        while not any("tuneloop: serving" in line for line in lines):
            line = server.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        time.sleep(1.5)
        question = "zebra question from jane@example.com with card 4111 1111 1111 1111"
        response = httpx.post(url + api.COMPLETIONS_PATH, headers={"Authorization": f"Bearer {key}"},
                              json={"messages": [{"role": "user", "content": question}]}, timeout=30)
        assert response.status_code == 200, response.text
        turn_id = int(response.json()["id"].removeprefix("chatcmpl-"))
        server.send_signal(signal.SIGTERM)
        rest, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    output = "".join(lines) + rest
    lines = [line for line in output.splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, bad  # every line is one JSON object
    events = [json.loads(line) for line in lines]
    (turn,) = [e for e in events if e["event"] == "turn finished"]
    assert turn["turn_id"] == turn_id and turn["adapter"] is None and turn["status"] == "complete"
    assert turn["latency_s"] >= 0 and turn["level"] == "info"
    assert server.returncode == 0 and any("all answers finished" in e["event"] for e in events), events
    assert "zebra" not in output and "1111" not in output and "jane@" not in output


def test_an_exception_is_logged_as_its_type_and_stack_without_its_message():
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("customer typed 4111 1111 1111 1111")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "generation failed", None, sys.exc_info())
    line = json.loads(formatter.format(record))
    assert line["event"] == "generation failed" and line["exception"] == "ValueError"
    assert "4111" not in json.dumps(line)
