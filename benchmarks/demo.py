"""Minutes from `make demo` to the first streamed answer and to the first promoted adapter.

Runs the real `make demo` on a fresh runtime home (install is a no-op when .venv is current),
then acts as a customer through the running app's API: waits for the page, asks a question and
times the first streamed chunk and the full answer; waits for the background retrain to finish;
asks again and checks, in the turn log, which adapter answered. With ``--screenshots DIR`` it also
drives Debian's Chromium to save the chat and the staff view (the README's pictures).

    .venv/bin/python benchmarks/demo.py [--screenshots docs] [--timeout-min 60]

Prints one line per milestone with the minutes since `make demo` started, then a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
QUESTION = "What does the Georgia Dream Mortgage offer first-time buyers?"
CHROMIUM = Path("/usr/bin/chromium")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port for the demo (default: a free one)")
    parser.add_argument("--screenshots", help="save chat.png and staff.png of the live demo here")
    parser.add_argument("--timeout-min", type=float, default=60, help="give up after this many minutes")
    args = parser.parse_args()
    from test_app import free_port

    port = args.port or free_port()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-demo-"))
    env = {**os.environ, "TUNELOOP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    marks: dict[str, float] = {}

    def mark(name: str, detail: str = "") -> None:
        marks[name] = round((time.perf_counter() - started) / 60, 2)
        print(f"[{marks[name]:6.2f} min] {name} {detail}".rstrip(), flush=True)

    demo = subprocess.Popen(["make", "-s", "demo", f"PORT={port}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(demo.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    summary: dict = {"home": str(home)}
    try:
        wait_for(lambda: _reachable(url), args.timeout_min * 60 - elapsed(started), "the demo page", demo, output)
        mark("page served", url)
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        job = client.submit(QUESTION, api_name="/chat")
        first_chunk = None
        for _ in job:
            if first_chunk is None:
                first_chunk = time.perf_counter()
                mark("first streamed chunk")
        _history, _box, turn = job.result()
        mark("first answer complete")
        db = home / "feedback.db"  # assistant.paths.feedback_db() of that home
        summary["first_answer"] = answer_row(db, int(turn))

        def run_finished() -> dict | None:
            with sqlite3.connect(db) as conn:
                conn.row_factory = sqlite3.Row
                row = conn.execute("select * from retrain_runs where status != 'running' order by id limit 1").fetchone()
            return dict(row) if row else None

        run = wait_for(run_finished, args.timeout_min * 60 - elapsed(started), "the background retrain", demo, output)
        summary["retrain"] = {k: run.get(k) for k in ("status", "candidate", "promoted", "reasons", "error")}
        mark("background retrain finished", json.dumps(summary["retrain"]))
        if run.get("promoted"):
            mark("first promoted adapter", run["candidate"])
            _history, _box, turn = client.predict(QUESTION, api_name="/chat")
            summary["answer_after_promotion"] = answer_row(db, int(turn))
            mark("answer from the promoted adapter", str(summary["answer_after_promotion"]["adapter"]))
        if args.screenshots:
            password = re.search(r"password (\S+) \(shown once\)", "".join(output))
            take_screenshots(url, Path(args.screenshots), password.group(1) if password else "")
            mark("screenshots saved", args.screenshots)
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
    summary["minutes"] = marks
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("answer_after_promotion") else 1


def elapsed(started: float) -> float:
    return time.perf_counter() - started


def wait_for(check, seconds: float, what: str, demo: subprocess.Popen, output: list[str]):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"make demo exited with {demo.returncode} while waiting for {what}:\n{''.join(output[-40:])}")
        if found := check():
            return found
        time.sleep(2)
    raise SystemExit(f"gave up waiting for {what}:\n{''.join(output[-40:])}")


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def answer_row(db: Path, turn: int) -> dict:
    with sqlite3.connect(db) as conn:
        answer, adapter, latency, first_token = conn.execute(
            "select answer, adapter, latency_s, first_token_s from turns where id = ?", [turn]).fetchone()
    return {"adapter": adapter, "answer": answer, "latency_s": latency, "first_token_s": first_token}


def take_screenshots(url: str, folder: Path, password: str) -> None:
    """The chat after one question and the staff view after signing in, in a real Chromium."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_placeholder("Ask a question").fill("Is there a fee for an incoming wire?")
        page.get_by_role("button", name="Send", exact=True).click()
        page.get_by_role("button", name="Dislike").last.wait_for()
        # Send comes back (Stop goes) when the answer has ended.
        page.get_by_role("button", name="Send", exact=True).wait_for(state="visible")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(folder / "chat.png"))
        page.goto(url.rstrip("/") + "/staff")
        page.get_by_label("Staff name").fill("staff")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Signed in as").wait_for()
        page.wait_for_timeout(3000)
        page.screenshot(path=str(folder / "staff.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
