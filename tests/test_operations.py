"""Issue 32, operations: liveness and readiness routes, Prometheus metrics that match the turns
table and hold no customer text, and a SIGTERM that lets answers in flight finish (real server on
127.0.0.1, real SQLite; the drain test runs `tuneloop serve` in its own process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client
from prometheus_client.parser import text_string_to_metric_families

import app
from assistant import paths
from assistant.chat import ChatService, ScriptedBackend
from assistant.config import ServeConfig
from feedback.db import ThreadLocalDB
from test_app import ask, free_port, serve_scripted

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def samples(text: str) -> dict:
    """``{(name, labels as sorted tuple): value}`` of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_and_readiness(tuneloop_home):
    service = ChatService(ServeConfig(), ScriptedBackend())
    demo = app.build_app(service, ThreadLocalDB(), "scripted-base")
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), 4, block=False)
    url = url.rstrip("/")
    try:
        health = httpx.get(url + app.HEALTH_PATH, timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = httpx.get(url + app.READY_PATH, timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["database"] is True and ready.json()["adapter"] is None
        # A pointer naming a missing adapter is not ready; neither is a draining server.
        pointer = paths.adapters_dir() / "current.json"
        pointer.write_text('{"version": "v-missing"}', encoding="utf-8")
        assert httpx.get(url + app.READY_PATH, timeout=10).status_code == 503
        pointer.unlink()
        assert httpx.get(url + app.READY_PATH, timeout=10).status_code == 200
        service.draining = True
        draining = httpx.get(url + app.READY_PATH, timeout=10)
        assert draining.status_code == 503 and draining.json()["draining"] is True
        assert httpx.get(url + app.HEALTH_PATH, timeout=10).status_code == 200
    finally:
        demo.close()


def test_metrics_match_the_turns_table_and_hold_no_customer_text(tuneloop_home):
    card = "4111 1111 1111 1111"
    with serve_scripted(delay_s=0.01, concurrency=1, max_queue=0) as served:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: _try_ask(served, f"zebra {i} paid with {card}"), range(12)))
        body = httpx.get(served.url + app.METRICS_PATH, timeout=10)
        assert body.status_code == 200 and body.headers["content-type"].startswith("text/plain")
        values = samples(body.text)
        answered = served.rows("SELECT status, count(*) FROM turns GROUP BY status")
        assert answered and dict(answered).get("complete", 0) == sum(r == "ok" for r in results)
        assert values[("tuneloop_answers_total", (("status", "complete"),))] == dict(answered)["complete"]
        assert values[("tuneloop_busy_refusals_total", ())] == sum(r == "busy" for r in results)
        assert values[("tuneloop_answer_seconds_count", ())] == len(served.rows("SELECT id FROM turns"))
        assert values[("tuneloop_first_token_seconds_count", ())] == dict(answered)["complete"]
        assert values[("tuneloop_answers_in_flight", ())] == 0
        assert values[("tuneloop_adapter_serving", (("version", "base"),))] == 1
        assert values[("tuneloop_feedback_rows", (("kind", "turns"),))] == len(served.rows("SELECT id FROM turns"))
        assert "zebra" not in body.text and "1111" not in body.text and "session" not in body.text
        # Through the proxy (X-Forwarded-For) /metrics is not there; a token opens it to others.
        proxied = httpx.get(served.url + app.METRICS_PATH, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
        assert proxied.status_code == 404
    with serve_scripted(metrics_token="s3cret-token") as served:
        assert httpx.get(served.url + app.METRICS_PATH, timeout=10).status_code == 404
        bearer = {"Authorization": "Bearer s3cret-token", "X-Forwarded-For": "203.0.113.9"}
        assert httpx.get(served.url + app.METRICS_PATH, headers=bearer, timeout=10).status_code == 200


def _try_ask(served, question: str) -> str:
    try:
        ask(served.client(), question)
        return "ok"
    except Exception as exc:  # gradio_client raises AppError with the customer's message
        return "busy" if "busy" in str(exc) else f"failed: {exc}"


# The real command line with the scripted backend (0.15 s a word) in place of a model; a script
# ends it with the cli.main call it needs (test_deploy runs it as `tuneloop` on PATH).
SCRIPTED_CLI = textwrap.dedent("""
    import sys
    from assistant import chat
    from tuneloop import cli

    class Base:
        model_id = "scripted-base"

    def make_backend(cfg):
        backend = chat.ScriptedBackend(delay_s=0.15)
        backend.base = Base()
        return backend

    chat.make_backend = make_backend
""")
SERVE_SCRIPTED = SCRIPTED_CLI + 'sys.exit(cli.main(["serve", "--port", sys.argv[1], "--drain-s", "20"]))\n'


def test_sigterm_lets_answers_in_flight_finish(tuneloop_home):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(app.__file__))}
    server = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPTED, str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        question = " ".join(["word"] * 30)  # the scripted answer streams 32 words, 0.15 s each
        clients = [Client(url, verbose=False, download_files=False) for _ in range(5)]
        jobs = [c.submit(question, api_name="/chat") for c in clients]
        deadline = time.monotonic() + 20
        while len(paths_rows("SELECT id FROM turns WHERE status = 'streaming'")) < 5:
            assert time.monotonic() < deadline, "the 5 answers never started"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(url + app.READY_PATH, timeout=5).status_code == 503
        results = [job.result(timeout=30) for job in jobs]
        assert all(r[0][-1]["content"][0]["text"].startswith("You asked:") for r in results)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        assert "all answers finished" in output, output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert paths_rows("SELECT status, count(*) FROM turns GROUP BY status") == [("complete", 5)]


def paths_rows(sql: str) -> list[tuple]:
    import sqlite3

    if not paths.feedback_db().exists():
        return []
    with sqlite3.connect(paths.feedback_db()) as conn:
        return conn.execute(sql).fetchall()


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    """Until /readyz says 200; fails with the server's output if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            if httpx.get(url + app.READY_PATH, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")
