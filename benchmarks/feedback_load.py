"""Feedback logging under load: N customers at once against the real Gradio server (scripted
backend), each its own gradio_client session, asking questions and voting on every answer.

Prints rows written per second, p50/p99 latency of the logging store calls (``start_turn``,
``finish_turn``, ``log_vote``, timed inside the server) and turns/votes sent vs stored.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/feedback_load.py --customers 20 --questions 5

Runs in a fresh temporary ``$TUNELOOP_HOME`` unless ``--home`` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class LoadConfig:
    customers: int = 20
    """Customers at once, each with its own gradio_client Client (its own session)."""
    questions: int = 5
    """Questions each customer asks; every answer gets one vote."""
    delay_s: float = 0.0
    """Scripted backend's pause per word, to mimic generation time."""
    concurrency: int = 8
    """Chats the Gradio queue runs at once."""
    home: str | None = None
    """Runtime home for the database; a fresh temporary folder when not given."""

    def __post_init__(self) -> None:
        if not 1 <= self.customers <= 500:
            raise ValueError("customers must be between 1 and 500")
        if not 1 <= self.questions <= 1000:
            raise ValueError("questions must be between 1 and 1000")
        if not 0 <= self.delay_s <= 1:
            raise ValueError("delay_s must be between 0 and 1")


def main(cfg: LoadConfig) -> dict:
    os.environ["TUNELOOP_HOME"] = cfg.home or tempfile.mkdtemp(prefix="tuneloop-load-")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import app
    from assistant import paths
    from assistant.chat import ChatService, ScriptedBackend
    from assistant.config import ServeConfig
    from feedback import store, turns
    from feedback.db import ThreadLocalDB
    from gradio_client import Client

    timings: dict[str, list[float]] = {"start_turn": [], "finish_turn": [], "log_vote": []}
    for module, name in ((turns, "start_turn"), (turns, "finish_turn"), (store, "log_vote")):
        setattr(module, name, _timed(getattr(module, name), timings[name]))

    serve = ServeConfig(concurrency=cfg.concurrency)
    demo = app.build_app(ChatService(serve, ScriptedBackend(delay_s=cfg.delay_s)), ThreadLocalDB(), "scripted-base")
    _, url, _ = app.launch(demo, "127.0.0.1", _free_port(), cfg.concurrency, block=False)
    errors: list[str] = []
    sent = {"turns": 0, "votes": 0}
    lock = threading.Lock()

    def customer(index: int) -> None:
        try:
            client = Client(url, verbose=False, download_files=False)
            for q in range(cfg.questions):
                _history, _box, turn_id = client.predict(f"customer {index} question {q}", api_name="/chat")
                with lock:
                    sent["turns"] += 1
                client.predict(int(turn_id), "up" if (index + q) % 2 else "down", "", api_name="/vote")
                with lock:
                    sent["votes"] += 1
        except Exception as exc:  # counted and reported; one failing customer must not hide the rest
            errors.append(f"customer {index}: {exc}")

    try:
        threads = [threading.Thread(target=customer, args=(i,)) for i in range(cfg.customers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall_s = time.perf_counter() - started
    finally:
        demo.close()

    with sqlite3.connect(paths.feedback_db()) as conn:
        stored_turns = conn.execute("SELECT count(*) FROM turns WHERE status = 'complete'").fetchone()[0]
        stored_votes = conn.execute("SELECT count(*) FROM votes").fetchone()[0]
    all_calls = [t for values in timings.values() for t in values]
    result = {
        "config": asdict(cfg),
        "wall_s": round(wall_s, 3),
        "rows_per_s": round((stored_turns + stored_votes) / wall_s, 1),
        "store_calls": len(all_calls),
        "logging_ms": {name: _percentiles(values) for name, values in timings.items()} | {"all": _percentiles(all_calls)},
        "turns": {"sent": sent["turns"], "stored": stored_turns},
        "votes": {"sent": sent["votes"], "stored": stored_votes},
        "errors": errors[:5],
    }
    return result


def _timed(fn, into: list[float]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    return wrapper


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50": round(statistics.median(ordered) * 1000, 2), "p99": round(p99 * 1000, 2)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=LoadConfig.customers, help="customers at once (default 20)")
    parser.add_argument("--questions", type=int, default=LoadConfig.questions, help="questions per customer (default 5)")
    parser.add_argument("--delay-s", type=float, default=LoadConfig.delay_s, help="scripted pause per word (default 0)")
    parser.add_argument("--concurrency", type=int, default=LoadConfig.concurrency, help="chats run at once (default 8)")
    parser.add_argument("--home", default=None, help="runtime home (default: a fresh temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = main(LoadConfig(args.customers, args.questions, args.delay_s, args.concurrency, args.home))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ms = result["logging_ms"]
        print(f"{result['config']['customers']} customers x {result['config']['questions']} questions in {result['wall_s']} s")
        print(f"rows/s (turns + votes stored / wall time): {result['rows_per_s']}")
        for name, values in ms.items():
            if values["n"]:
                print(f"  {name:<12} n={values['n']:<5} p50={values['p50']:.2f} ms  p99={values['p99']:.2f} ms")
        print(f"turns sent/stored: {result['turns']['sent']}/{result['turns']['stored']}   "
              f"votes sent/stored: {result['votes']['sent']}/{result['votes']['stored']}")
        for error in result["errors"]:
            print(f"error: {error}")
    lost = result["turns"]["sent"] != result["turns"]["stored"] or result["votes"]["sent"] != result["votes"]["stored"]
    return 1 if lost or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(cli())
