"""Issues 32 and 26, how `tuneloop serve` starts: the port opens before the model has loaded
(/readyz 503 "starting", a customer is told to come back in a moment, /v1 answers 503), a model that
fails to load or a taken port ends the process with one line, and the staff view on a port of its
own (the chat's port then answers 404 for every staff page, route and event). Real servers on
127.0.0.1; `tuneloop serve` runs in its own process with the scripted backend, whose load waits
until the test lets it finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

import app
from assistant.chat import STARTING_MESSAGE, ChatService, ScriptedBackend
from assistant.config import ConfigError, ServeConfig
from feedback import api, apikeys, auth
from feedback.db import ThreadLocalDB, connect
from test_app import STAFF_PASSWORD, ask, free_port
from test_customer_chat import outputs_until_done, texts
from test_operations import paths_rows

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

REPO = Path(app.__file__).resolve().parent
# `tuneloop serve` with the scripted backend, whose loading lasts until the file argv[1] exists
# (it touches argv[1] + ".called" first, so a test can tell that loading had begun).
SERVE_LOADING = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    from assistant import chat
    from tuneloop import cli

    class Base:
        model_id = "scripted-base"

    def make_backend(cfg):
        release = Path(sys.argv[1])
        Path(sys.argv[1] + ".called").touch()
        while not release.exists():
            time.sleep(0.05)
        backend = chat.ScriptedBackend()
        backend.base = Base()
        return backend

    chat.make_backend = make_backend
    sys.exit(cli.main(["serve", *sys.argv[2:]]))
""")
STAFF_API_NAMES = sorted(set(app.API_NAMES) - {"chat", "vote"})


class Serve:
    """`tuneloop serve` in its own process; stdout and stderr go to files the test reads any time."""

    def __init__(self, folder: Path, *args: str, script: str = SERVE_LOADING):
        self.release = folder / "release-the-model"
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-c", script, str(self.release), *args] if script else \
            [sys.executable, "-m", "tuneloop.cli", "serve", *args]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=err, text=True)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr_lines(self) -> list[str]:
        return [line for line in self.err.read_text().splitlines() if line.strip()]

    def loading_began(self) -> bool:
        return Path(str(self.release) + ".called").exists()

    def wait_for(self, url: str, status: int, timeout: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.stdout() + self.err.read_text()
            try:
                response = httpx.get(url, timeout=2)
                if response.status_code == status:
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} never answered {status}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_the_port_answers_while_the_model_loads_and_is_ready_once_it_has(tmp_path, tuneloop_home):
    key = apikeys.create_key(connect(), "web")
    auth.add_staff(connect(), "alice", STAFF_PASSWORD)
    port, staff_port = free_port(), free_port()
    url, staff_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{staff_port}"
    bearer = {"Authorization": f"Bearer {key}"}
    question = {"messages": [{"role": "user", "content": "How do I reset my PIN?"}]}
    server = Serve(tmp_path, "--port", str(port), "--staff-port", str(staff_port))
    try:
        server.wait_for(url + app.HEALTH_PATH, 200)  # the port opens first, then the model starts to load
        deadline = time.monotonic() + 30
        while not server.loading_began():
            assert time.monotonic() < deadline, "the model never started to load"
            time.sleep(0.05)
        ready = httpx.get(url + app.READY_PATH, timeout=10)
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "starting" and ready.json()["loading"] is True
        # A customer's question is answered in the chat, as a message, not an exception page.
        outputs, error = outputs_until_done(Client(url, verbose=False, download_files=False), "How do I reset my PIN?")
        assert error is not None and STARTING_MESSAGE in str(error)
        assert texts(outputs[-1][0]) == [("user", "How do I reset my PIN?"), ("assistant", STARTING_MESSAGE)]
        refused = httpx.post(url + api.COMPLETIONS_PATH, headers=bearer, json=question, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["message"] == STARTING_MESSAGE
        assert httpx.get(url + api.MODELS_PATH, headers=bearer, timeout=10).status_code == 503
        assert httpx.get(staff_url + app.STAFF_LOGIN_PATH, timeout=10).status_code == 200
        assert "serving" not in server.stdout()

        server.release.touch()
        server.wait_for(url + app.READY_PATH, 200)
        lines = server.stdout().splitlines()
        assert sum("tuneloop: serving" in line for line in lines) == 1, lines
        assert any(line.startswith("tuneloop: serving") and line.endswith(f"at {url}") for line in lines), lines
        assert f"tuneloop: staff view at {staff_url}{app.STAFF_PATH}" in lines
        turn_id = ask(Client(url, verbose=False, download_files=False), "How do I reset my PIN?")
        answered = httpx.post(url + api.COMPLETIONS_PATH, headers=bearer, json=question, timeout=30)
        assert answered.status_code == 200, answered.text
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.err.read_text()
        assert "all answers finished" in server.stdout()
    finally:
        server.stop()
    # The question refused while loading is no turn; the two answered afterwards are.
    assert paths_rows("SELECT id, status FROM turns ORDER BY id")[0] == (turn_id, "complete")
    assert paths_rows("SELECT status, count(*) FROM turns GROUP BY status") == [("complete", 2)]


def test_sigterm_while_the_model_loads_exits_cleanly(tmp_path, tuneloop_home):
    port = free_port()
    server = Serve(tmp_path, "--port", str(port))
    try:
        server.wait_for(f"http://127.0.0.1:{port}{app.READY_PATH}", 503)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.err.read_text()
    finally:
        server.stop()
    assert "tuneloop: stopped (before the model had loaded)" in server.stdout()
    assert "serving" not in server.stdout()
    app.check_address("127.0.0.1", port)  # the port is free again


def test_a_model_that_fails_to_load_ends_the_process_with_one_line(tmp_path, tuneloop_home):
    port = free_port()
    missing = tmp_path / "no-such-model"
    # The real `tuneloop serve` and the real backend, given a base model that is nowhere.
    server = Serve(tmp_path, "--port", str(port), "--base-model", str(missing), "--backend", "transformers", script="")
    try:
        assert server.process.wait(timeout=180) == 1
    finally:
        server.stop()
    (error,) = server.stderr_lines()
    assert error.startswith(f"tuneloop: could not load the model {missing}: ModelError: cannot find base model"), error
    assert server.stdout() == ""  # no "serving" line, nor Gradio's own "Closing server" one
    app.check_address("127.0.0.1", port)


@pytest.mark.parametrize("taken", ["port", "staff_port"])
def test_a_taken_port_is_said_in_one_line_before_the_model_loads(taken, tmp_path, tuneloop_home):
    ports = {"port": free_port(), "staff_port": free_port()}
    with socket.create_server(("127.0.0.1", ports[taken])):
        server = Serve(tmp_path, "--port", str(ports["port"]), "--staff-port", str(ports["staff_port"]))
        try:
            assert server.process.wait(timeout=90) == 1
        finally:
            server.stop()
    assert server.stderr_lines() == [f"tuneloop: port {ports[taken]} on 127.0.0.1 is already in use "
                                     "(another tuneloop serve?); stop it or choose another port"]
    assert not server.loading_began()
    assert "serving" not in server.stdout()


def test_the_launch_itself_refuses_a_taken_port_in_the_same_words(tuneloop_home):
    # What a port taken between the check and the launch meets: Gradio's own refusal, reworded.
    demo = app.build_app(ChatService(ServeConfig(), ScriptedBackend()), ThreadLocalDB(), "scripted-base")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(app.AddressInUse, match=f"^port {port} on 127.0.0.1 is already in use"):
            app.check_address("127.0.0.1", port)
        with pytest.raises(app.AddressInUse, match=f"^port {port} on 127.0.0.1 is already in use"):
            app._launch(demo, "127.0.0.1", port, 4, block=False)


def test_staff_port_must_differ_from_the_chat_port():
    with pytest.raises(ConfigError, match="staff_port must differ from port"):
        ServeConfig(port=7860, staff_port=7860)
    with pytest.raises(ConfigError, match="staff_port must be between"):
        ServeConfig(staff_port=70000)


def test_with_a_staff_port_the_chat_port_has_no_staff_surface_and_the_staff_port_has_it(tuneloop_home):
    auth.add_staff(connect(), "alice", STAFF_PASSWORD)
    key = apikeys.create_key(connect(), "web")
    cfg = ServeConfig(port=free_port(), staff_port=free_port())
    demo = app.build_app(ChatService(cfg, ScriptedBackend()), ThreadLocalDB(), "scripted-base")
    staff_blocks = demo.tuneloop_staff
    app.launch(demo, "127.0.0.1", cfg.port, 4, block=False)
    url, staff_url = f"http://127.0.0.1:{cfg.port}", f"http://127.0.0.1:{cfg.staff_port}"
    try:
        turn_id = ask(Client(url, verbose=False, download_files=False), "How do I reset my PIN?")
        # The chat's port: the staff pages and sign-in are not there ...
        for path in (app.STAFF_PATH, app.STAFF_PATH + "/", app.STAFF_LOGIN_PATH, app.STAFF_LOGOUT_PATH):
            assert httpx.get(url + path, timeout=10).status_code == 404, path
        signin = httpx.post(url + app.STAFF_LOGIN_PATH, data={"name": "alice", "password": STAFF_PASSWORD}, timeout=10)
        assert signin.status_code == 404 and app.STAFF_COOKIE not in signin.cookies
        # ... nor any staff event, by API name on every route Gradio runs one, or by function index.
        for name in STAFF_API_NAMES:
            for route in ("call", "call/v2", "run", "api"):
                refused = httpx.post(f"{url}/gradio_api/{route}/{name}", json={"data": []}, timeout=10)
                assert refused.status_code == 404, (route, name, refused.text)
        for index in range(len(demo.fns), len(demo.fns) + len(staff_blocks.fns)):
            join = {"data": [1], "fn_index": index, "session_hash": "s" * 11, "event_data": None, "trigger_id": None}
            assert httpx.post(url + "/gradio_api/queue/join", json=join, timeout=10).status_code == 404
        assert sorted(httpx.get(url + "/gradio_api/info", timeout=10).json()["named_endpoints"]) == ["/chat", "/vote"]
        # ... while it still publishes the chat, the /v1 API and the health routes; /metrics only here.
        assert httpx.get(url + "/", timeout=10).status_code == 200
        assert httpx.get(url + app.HEALTH_PATH, timeout=10).status_code == 200
        assert httpx.get(url + app.READY_PATH, timeout=10).status_code == 200
        assert httpx.get(url + api.MODELS_PATH, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        assert httpx.get(url + app.METRICS_PATH, timeout=10).status_code == 200
        proxied = httpx.get(url + app.METRICS_PATH, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
        assert proxied.status_code == 404

        # The staff port: its front page leads to the staff view, which leads to the sign-in ...
        assert httpx.get(staff_url + "/", timeout=10).headers["location"] == app.STAFF_PATH
        assert httpx.get(staff_url + app.STAFF_PATH, timeout=10).headers["location"] == app.STAFF_LOGIN_PATH
        signin = httpx.post(staff_url + app.STAFF_LOGIN_PATH, data={"name": "alice", "password": STAFF_PASSWORD},
                            timeout=30)
        assert signin.status_code == 303, signin.text
        cookie = signin.cookies[app.STAFF_COOKIE]
        assert httpx.get(staff_url + app.STAFF_PATH, cookies={app.STAFF_COOKIE: cookie}, timeout=10).status_code == 200
        staff = Client(staff_url, verbose=False, download_files=False,
                       headers={"Cookie": f"{app.STAFF_COOKIE}={cookie}"})
        assert [row[0] for row in staff.predict(api_name="/review_queue")["data"]] == [turn_id]
        with pytest.raises(Exception, match="Staff only"):
            Client(staff_url, verbose=False, download_files=False).predict(api_name="/review_queue")
        # ... and it has no chat, no /v1 API and no metrics.
        assert httpx.post(staff_url + "/gradio_api/call/chat", json={"data": ["hi"]}, timeout=10).status_code == 404
        assert httpx.get(staff_url + api.MODELS_PATH, timeout=10).status_code == 404
        assert httpx.get(staff_url + app.METRICS_PATH, timeout=10).status_code == 404
    finally:
        app.close(demo)
