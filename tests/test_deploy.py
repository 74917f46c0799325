"""Issue 32, the deployment recipe in deploy/: the container's entrypoint run directly against a
temporary home (first start sets it up, a second does not, a bad config is refused, SIGTERM drains),
its health check, the Containerfile read by Docker's own parser, the package its COPY lines build,
the systemd units (systemd-analyze verify where it exists) and the Caddyfile in front of a live server.

No container runs here (this machine has no container runtime): what a built image does beyond the
entrypoint, health check and package is not tested.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import dockerfile
import httpx
import pytest
from gradio_client import Client

import app
from assistant import paths
from assistant.config import ServeConfig
from feedback import apikeys
from feedback.db import connect
from test_app import free_port, serve_scripted
import test_operations
from test_operations import SCRIPTED_CLI, paths_rows

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"

# `tuneloop` on PATH for the entrypoint: the real command line with the scripted backend in place of
# a model for `serve`, as in test_operations' drain test.
TUNELOOP_SCRIPTED = SCRIPTED_CLI + "sys.exit(cli.main(sys.argv[1:]))\n"


def entrypoint_env(tmp_path: Path, port: int, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        command = bin_dir / "tuneloop"
        command.write_text(f"#!{sys.executable}\n{TUNELOOP_SCRIPTED}", encoding="utf-8")
        command.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            # The entrypoint binds 0.0.0.0 unless told otherwise; a test keeps to loopback.
            "TUNELOOP_SERVE_HOST": "127.0.0.1", "TUNELOOP_SERVE_PORT": str(port), "TUNELOOP_SERVE_DRAIN_S": "20", **extra}


def start(env: dict, *args: str) -> subprocess.Popen:
    # A session of its own, so whatever it leaves running (a server a shell did not exec) can be killed.
    return subprocess.Popen([str(ENTRYPOINT), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def wait_ready(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Until /readyz says 200; the first start sets up the home first (a minute or more on 2 busy cores)."""
    try:
        test_operations.wait_ready(url, server, seconds)
    except AssertionError:
        kill_group(server)
        raise AssertionError(f"the server never became ready:\n{server.communicate()[0]}") from None


def healthcheck(env: dict) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=60).returncode


def serve_and_drain(env: dict, url: str, answers: int, warm_up: bool = False) -> str:
    """Start the entrypoint, wait for /readyz, put ``answers`` customer answers in flight, SIGTERM the
    entrypoint's process id and check they all finish; returns the server's output. ``warm_up`` asks
    one question to the end first."""
    server = start(env)
    try:
        wait_ready(url, server, 600)  # a first start sets the home up before it listens
        assert healthcheck(env) == 0
        if warm_up:
            Client(url, verbose=False, download_files=False).predict("hello", api_name="/chat")
        question = " ".join(["word"] * 30)  # 32 words at 0.15 s: in flight when SIGTERM comes
        jobs = [Client(url, verbose=False, download_files=False).submit(question, api_name="/chat")
                for _ in range(answers)]
        deadline = time.monotonic() + 20
        while len(paths_rows("SELECT id FROM turns WHERE status = 'streaming'")) < answers:
            assert time.monotonic() < deadline, "the answers never started"
            time.sleep(0.05)
        # The signal goes to the entrypoint's process: only an exec'd tuneloop drains on it (a shell
        # that ran it as a child would die and leave the server running).
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        if answers:
            assert httpx.get(url + app.READY_PATH, timeout=5).status_code == 503
            assert healthcheck(env) == 1
        try:
            results = [job.result(timeout=30) for job in jobs]
        except Exception as exc:
            kill_group(server)
            raise AssertionError(f"an answer failed ({exc!r}); the server said:\n{server.stdout.read()}") from exc
        assert all(r[0][-1]["content"][0]["text"].startswith("You asked:") for r in results)
        output, _ = server.communicate(timeout=30)
    finally:
        kill_group(server)
    assert server.returncode == 0, output
    assert f"draining {answers} answer(s)" in output and "all answers finished" in output, output
    return output


def test_entrypoint_execs_the_server_which_drains_on_sigterm(tuneloop_home, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = entrypoint_env(tmp_path, port, TUNELOOP_INIT_PACK="")  # an empty home, for your own data
    assert healthcheck(env) == 1  # nothing listens yet
    output = serve_and_drain(env, url, answers=3)
    assert "left empty (TUNELOOP_INIT_PACK is empty)" in output and "setting it up" not in output, output
    assert paths_rows("SELECT status, count(*) FROM turns GROUP BY status") == [("complete", 3)]
    assert paths_rows("SELECT count(*) FROM examples") == [(0,)]
    # The home has a database now: a restart says nothing about a new home.
    output = serve_and_drain(env, url, answers=1)
    assert "new home" not in output, output
    assert paths_rows("SELECT status, count(*) FROM turns GROUP BY status") == [("complete", 4)]


@pytest.mark.slow
def test_entrypoint_sets_up_a_new_home_with_the_demo_pack_once(tiny_model_dir, tuneloop_home, tmp_path):
    # Slow: a real `tuneloop init` (1,000+ examples curated and indexed), 2-3 minutes on 2 busy cores.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # init prepares the tiny model instead of converting the bundled one.
    env = entrypoint_env(tmp_path, port, TUNELOOP_SERVE_BASE_MODEL=str(tiny_model_dir))
    output = serve_and_drain(env, url, answers=1)
    assert "setting it up with the peach_state_bank pack" in output, output
    assert sorted(p.name for p in paths.datasets_dir().iterdir()) == ["d0001"]
    examples = paths_rows("SELECT count(*) FROM examples")
    assert examples[0][0] >= 1000
    # No warm-up: a fresh server's first answer, in flight at the SIGTERM, must reach its client (it
    # once got "unexpected_error": the queue stopped before its last message left, app.wait_delivered).
    output = serve_and_drain(env, url, answers=1)
    assert "setting it up" not in output, output
    assert sorted(p.name for p in paths.datasets_dir().iterdir()) == ["d0001"]
    assert paths_rows("SELECT count(*) FROM examples") == examples
    assert paths_rows("SELECT status, count(*) FROM turns GROUP BY status") == [("complete", 2)]


@pytest.mark.parametrize("setting", ["file", "env"])
def test_entrypoint_refuses_a_bad_config_before_writing_anything(tuneloop_home, tmp_path, setting):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    extra = {}
    if setting == "file":
        (tuneloop_home / "config.toml").write_text('[serve]\nport = "the usual"\n', encoding="utf-8")
    else:
        extra["TUNELOOP_SERVE_TEMPERATURE"] = "5"
    env = entrypoint_env(tmp_path, free_port(), **extra)
    if setting == "file":
        del env["TUNELOOP_SERVE_PORT"]  # the environment would win over the file's bad port
    result = subprocess.run([str(ENTRYPOINT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    expected = "port: 'the usual' is not a valid int" if setting == "file" else "temperature must be between 0 and 2"
    assert expected in result.stderr and "refusing to start" in result.stderr, result.stderr
    assert sorted(p.name for p in tuneloop_home.iterdir()) == (["config.toml"] if setting == "file" else [])


def test_entrypoint_runs_other_commands_as_they_are_without_setting_up_the_home(tuneloop_home, tmp_path):
    # `restore DIR` needs an empty home: any command but serve and retrain must leave it as it is.
    result = subprocess.run([str(ENTRYPOINT), "config", "show"], env=entrypoint_env(tmp_path, 8123), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"port": 8123' in result.stdout
    assert not paths.feedback_db().exists()


def final_stage(instructions: list) -> list:
    """The instructions after the last FROM: what the image runs with."""
    last = max(i for i, ins in enumerate(instructions) if ins.cmd == "FROM")
    return instructions[last:]


def one(stage: list, cmd: str):
    (found,) = [ins for ins in stage if ins.cmd == cmd]
    return found


def test_containerfile_runs_the_entrypoint_as_a_user_with_the_home_on_a_volume():
    instructions = dockerfile.parse_file(str(DEPLOY / "Containerfile"))
    args = {ins.value[0].split("=", 1)[0]: ins.value[0].split("=", 1)[1] for ins in instructions
            if ins.cmd == "ARG" and "=" in ins.value[0]}
    assert "python:3.11" in args["BASE"] and "/whl/cpu" in args["TORCH_INDEX"]  # CPU unless told otherwise
    assert all(ins.value[0] == "${BASE}" for ins in instructions if ins.cmd == "FROM")
    stage = final_stage(instructions)
    user = one(stage, "USER").value[0]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    env = dict(zip(one(stage, "ENV").value[::2], one(stage, "ENV").value[1::2]))
    assert one(stage, "VOLUME").value == (env["TUNELOOP_HOME"],)
    assert str(ServeConfig().port) in one(stage, "EXPOSE").value
    copied = {}  # path in the image -> file in the repository
    for ins in stage:
        if ins.cmd == "COPY" and not ins.flags:
            *sources, target = ins.value
            for source in sources:
                copied[target.rstrip("/") + "/" + Path(source).name] = REPO / source
    (entrypoint,) = one(stage, "ENTRYPOINT").value
    assert copied[entrypoint] == ENTRYPOINT and os.access(ENTRYPOINT, os.X_OK)
    health = one(stage, "HEALTHCHECK").value
    assert health[0] == "CMD" and health[1] == "python" and copied[health[2]] == HEALTHCHECK
    assert {"--interval=30s", "--start-period=180s"} <= set(one(stage, "HEALTHCHECK").flags)
    assert one(stage, "CMD").value == ("serve",)


def test_the_containerfile_copies_enough_to_build_a_package_with_the_packs(tmp_path):
    # Only what the build stage's COPY lines name goes into the image: build the wheel from exactly that.
    build = [ins for ins in dockerfile.parse_file(str(DEPLOY / "Containerfile")) if ins.cmd == "COPY" and not ins.flags]
    source = tmp_path / "src"
    source.mkdir()
    for ins in build:
        for name in ins.value[:-1]:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif not name.startswith("deploy/"):  # the final stage's scripts are not part of the package
                shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("tuneloop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    pack = "assistant/packs/peach_state_bank/"
    assert {"app.py", "tuneloop/cli.py", "trainer/train.py", pack + "pack.json", pack + "qa.jsonl",
            pack + "persona.txt", pack + "general.txt", pack + "catalog.json"} <= names


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / name).read_text(encoding="utf-8"))
    return parser


def test_systemd_units_stop_after_the_drain_and_write_only_the_home(tmp_path):
    serve = unit("tuneloop-serve.service")["Service"]
    home = serve["Environment"].removeprefix("TUNELOOP_HOME=")
    assert serve["ExecStart"].endswith("tuneloop serve") and serve["Restart"] == "on-failure"
    assert float(serve["TimeoutStopSec"]) > ServeConfig().drain_s
    assert serve["NoNewPrivileges"] == "true" and serve["ProtectSystem"] == "strict" and serve["PrivateTmp"] == "true"
    assert serve["ReadWritePaths"] == home and serve["User"] != "root"
    retrain = unit("tuneloop-retrain.service")["Service"]
    assert retrain["Type"] == "oneshot" and retrain["ExecStart"].endswith("tuneloop retrain --json")
    assert retrain["Environment"] == serve["Environment"] and retrain["ReadWritePaths"] == home
    timer = unit("tuneloop-retrain.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:30:00" and timer["Install"]["WantedBy"] == "timers.target"
    if shutil.which("systemd-analyze") is None:
        return
    # verify checks every key and that ExecStart's program exists: point /srv/tuneloop at this checkout.
    for name in ("tuneloop-serve.service", "tuneloop-retrain.service", "tuneloop-retrain.timer"):
        (tmp_path / name).write_text((DEPLOY / name).read_text(encoding="utf-8").replace("/srv/tuneloop", str(REPO)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", "tuneloop-serve.service",
                             "tuneloop-retrain.service", "tuneloop-retrain.timer"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # It warns about unknown keys and bad values on stderr and still exits 0: both must be clean.
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed (apt-get install caddy)")
def test_caddyfile_publishes_the_chat_and_the_api_but_not_staff_or_metrics(tuneloop_home, tmp_path):
    key = apikeys.create_key(connect(), "web")
    with serve_scripted() as served:
        proxy_port = free_port()
        site = (DEPLOY / "Caddyfile").read_text(encoding="utf-8")
        # The same site block over plain HTTP on loopback (no certificate to fetch here), no admin port.
        assert "chat.example.com {" in site and "reverse_proxy 127.0.0.1:7860" in site
        site = site.replace("chat.example.com {", f"http://127.0.0.1:{proxy_port} {{")
        site = site.replace("reverse_proxy 127.0.0.1:7860", f"reverse_proxy {served.url.removeprefix('http://')}")
        config = tmp_path / "Caddyfile"
        config.write_text("{\n\tadmin off\n}\n\n" + site, encoding="utf-8")
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "XDG_DATA_HOME": str(tmp_path / "xdg"),
               "HOME": str(tmp_path)}
        caddy = subprocess.Popen(["caddy", "run", "--config", str(config), "--adapter", "caddyfile"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        proxy = f"http://127.0.0.1:{proxy_port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert caddy.poll() is None, caddy.stderr.read()
                try:
                    page = httpx.get(proxy + "/", timeout=5)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "caddy never answered"
                    time.sleep(0.2)
            assert page.status_code == 200 and "<html" in page.text.lower()
            for path in (app.STAFF_PATH, app.STAFF_LOGIN_PATH, app.METRICS_PATH, app.READY_PATH, app.HEALTH_PATH):
                assert httpx.get(proxy + path, timeout=10).status_code == 404, path
                assert httpx.get(served.url + path, timeout=10).status_code != 404, path  # there, but not published
            assert httpx.post(proxy + app.STAFF_LOGIN_PATH, data={"name": "alice", "password": "x"},
                              timeout=10).status_code == 404
            answer = httpx.post(proxy + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                json={"model": "any", "messages": [{"role": "user", "content": "Is this proxied?"}]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == "You asked: Is this proxied?"
            # The customer chat itself works through the proxy.
            history, _box, _turn = Client(proxy, verbose=False, download_files=False).predict("Hello there", api_name="/chat")
            assert history[-1]["content"][0]["text"] == "You asked: Hello there"
        finally:
            caddy.terminate()
            caddy.wait(timeout=30)
