"""Serving under load: the transformers backend vs the llama.cpp backend, through the real web app.

Each backend serves ``tuneloop``'s Gradio app on 127.0.0.1 in a process of its own (so peak
memory is its own); customers are ``gradio_client`` sessions, in a process of their own, asking the same pack
questions over real HTTP, 1, 5 and 20 of them at once (each level asks at least as many questions as it has
customers). Per backend and level it prints time to first token and whole-answer latency p50/p99
(measured by the customer), decode tokens/s (all answer tokens over the level's wall time, and the
median per-answer rate after its first token, from the turn log), and the process's peak memory;
then label F1 and answer F1 of the answers served one at a time (an answer labeler fitted on the
pack's other answers), so speed is never bought with quality. A last line checks the targets:
llama.cpp decode >= 5x transformers nf4, its p99 first token < 2 s at 20 customers, label F1 within
0.01.

    .venv/bin/python benchmarks/serving.py [--quick] [--questions 40] [--levels 1,5,20] [--home DIR]

``--quick`` (about 7 minutes on 2 cores) asks 8 questions. ``--home`` serves from an existing
``$TUNELOOP_HOME`` (e.g. one where ``tuneloop retrain`` promoted an adapter); by default a fresh
one, where the base model serves. ``--lora`` serves a random r=16 LoRA on every projection.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-bench-serving-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from assistant import paths  # noqa: E402

paths.configure_environment()

BACKENDS = ("transformers", "llama_cpp")
PACK = "peach_state_bank"


def question_rows(count: int) -> tuple[list[dict], list[dict]]:
    """(rows asked, rows the answer labeler is fitted on): the latest dataset snapshot's test and
    train splits when the home has one, else the pack's first ``count`` rows and the rest."""
    from feedback import datasets

    snapshot = datasets.latest_snapshot()
    if snapshot is not None:
        return datasets.load_split(snapshot, "test")[:count], datasets.load_split(snapshot, "train")
    text = (paths.pack_dir(PACK) / "qa.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:count], rows[count:]


def make_lora() -> str:
    """The random r=16 LoRA on every projection that benchmarks/serve.py measures, put in service."""
    from assistant import adapters
    from serve import make_adapter  # benchmarks/ is this script's folder, first on sys.path

    version = make_adapter()
    adapters.set_current(version, "benchmark")
    return version


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(content) -> str:
    """A chat message's text: Gradio sends a string or a list of typed parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return content or ""


def ask(client, question: str) -> dict:
    """One customer question over HTTP: the answer, time to its first text, whole-answer time."""
    started = time.perf_counter()
    first, history = None, []
    job = client.submit(question, api_name="/chat")
    for output in job:
        history = next((part for part in output if isinstance(part, list)), history)
        if first is None and history and _text(history[-1].get("content")):
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    answer = _text(history[-1]["content"]) if history else ""
    return {"answer": answer, "first_s": first if first is not None else total, "total_s": total}


def customers_process(url: str, asked: list[str], customers: int) -> dict:
    """Runs in a process of its own (the customers are not the server's threads): ``customers``
    gradio_client sessions ask ``asked`` between them; per answer, the customer's timings."""
    from gradio_client import Client

    clients = [Client(url, verbose=False, download_files=False) for _ in range(customers)]
    results: list[dict | None] = [None] * len(asked)

    def customer(index: int) -> None:
        for slot in range(index, len(asked), customers):  # each customer asks its share in turn
            results[slot] = ask(clients[index], asked[slot])

    started = time.perf_counter()
    threads = [threading.Thread(target=customer, args=(i,)) for i in range(customers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"wall_s": time.perf_counter() - started, "results": results}


def run_level(url: str, questions: list[str], customers: int, db) -> dict:
    asked = [questions[i % len(questions)] for i in range(max(len(questions), customers))]
    last_turn = next(iter(db.query("select coalesce(max(id), 0) as id from turns")))["id"]
    done = subprocess.run([sys.executable, __file__, "--customers-of", url, "--levels", str(customers)],
                          input=json.dumps(asked), capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the customers failed:\n{done.stderr[-3000:]}")
    measured = json.loads(line.removeprefix("RESULT "))
    wall, results = measured["wall_s"], measured["results"]
    turns = list(db.query("select tokens_out, latency_s, first_token_s from turns where id > ?", [last_turn]))
    rates = [(t["tokens_out"] - 1) / (t["latency_s"] - t["first_token_s"]) for t in turns
             if t["tokens_out"] and t["tokens_out"] > 1 and t["first_token_s"] is not None and t["latency_s"] > t["first_token_s"]]
    server_firsts = [t["first_token_s"] for t in turns if t["first_token_s"] is not None]
    firsts, totals = [r["first_s"] for r in results], [r["total_s"] for r in results]
    return {
        "customers": customers,
        "answers": len(asked),
        "first_token_p50_s": round(statistics.median(firsts), 2),
        "first_token_p99_s": round(percentile(firsts, 0.99), 2),
        "server_first_token_p99_s": round(percentile(server_firsts, 0.99), 2) if server_firsts else None,
        "latency_p50_s": round(statistics.median(totals), 2),
        "latency_p99_s": round(percentile(totals, 0.99), 2),
        "tokens_per_s_all": round(sum(t["tokens_out"] or 0 for t in turns) / wall, 1),
        "tokens_per_s_per_answer": round(statistics.median(rates), 1) if rates else None,
        "wall_s": round(wall, 1),
        "texts": [r["answer"] for r in results[: len(questions)]],
    }


def child(backend_name: str, count: int, levels: list[int], lora: bool) -> dict:
    """Serve with one backend and put every level of customers through it (runs in its own process)."""
    import app
    from assistant.chat import ChatService, make_backend
    from assistant.config import ServeConfig
    from evals import metrics
    from evals.labeler import AnswerLabeler
    from feedback.db import ThreadLocalDB
    from feedback.knowledge import KnowledgeIndex

    if lora:
        make_lora()
    asked, others = question_rows(count)
    # As served (the config file and environment of this home), with room for the largest level.
    cfg = ServeConfig(**{**_served(), "backend": backend_name, "device": "cpu", "concurrency": max(levels)})
    started = time.perf_counter()
    backend = make_backend(cfg)
    load_s = time.perf_counter() - started
    db = ThreadLocalDB()
    # As `tuneloop serve` answers: with the home's knowledge index (references for the base model,
    # or for an adapter trained with them).
    demo = app.build_app(ChatService(cfg, backend, references=KnowledgeIndex(db.get)), db, backend.base.model_id, title=cfg.title)
    port = _free_port()
    app.launch(demo, "127.0.0.1", port, cfg.concurrency, block=False)
    url = f"http://127.0.0.1:{port}/"
    ask(__import__("gradio_client").Client(url, verbose=False, download_files=False), "Hello")  # warm-up
    questions = [row["question"] for row in asked]
    results = [run_level(url, questions, customers, db.get()) for customers in levels]
    # Quality of what was served, from the one-customer level (greedy, answered alone).
    served = results[0]["texts"]
    labeler = AnswerLabeler().fit([r["answer"] for r in others], [r["label"] for r in others])
    label_f1 = metrics.label_scores([r["label"] for r in asked], labeler.predict(served))["f1"]
    answer_f1 = statistics.mean(metrics.answer_f1(a, r["answer"]) for a, r in zip(served, asked))
    return {
        "backend": backend_name,
        "weights": cfg.quantization if backend_name == "transformers" else f"GGUF ({backend.gguf.name})",
        "adapter": getattr(backend, "active", None),
        "load_s": round(load_s, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "label_f1": round(label_f1, 4),
        "answer_f1": round(answer_f1, 4),
        "levels": results,
    }


def _served() -> dict:
    from assistant.config import ServeConfig, as_dict, load

    return as_dict(load(ServeConfig, "serve"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 questions (about 7 minutes on 2 cores)")
    parser.add_argument("--questions", type=int, default=40, help="pack questions asked at each level (default 40)")
    parser.add_argument("--levels", default="1,5,20", help="customers at once, comma-separated (default 1,5,20)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="backends to compare (default both)")
    parser.add_argument("--home", help="serve from this TUNELOOP_HOME (default: a fresh temporary one)")
    parser.add_argument("--lora", action="store_true", help="serve a random r=16 LoRA adapter on both backends")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--customers-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.customers_of:  # the customers of one level, questions on stdin
        print("RESULT " + json.dumps(customers_process(args.customers_of, json.loads(sys.stdin.read()), int(args.levels))), flush=True)
        return
    count = 8 if args.quick else args.questions
    levels = [int(level) for level in args.levels.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args.child, count, levels, args.lora)), flush=True)
        return
    if not args.home:  # a fresh home answers as the pack's bank: its persona, as `tuneloop init` installs it
        from feedback import packs

        packs.install_persona(packs.load_pack(PACK))
    env = {**os.environ, "TUNELOOP_HOME": args.home or os.environ["TUNELOOP_HOME"]}
    results = {}
    for name in args.backends.split(","):
        command = [sys.executable, __file__, "--child", name, "--questions", str(count), "--levels", args.levels]
        done = subprocess.run(command + (["--lora"] if args.lora else []), env=env, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
    for result in results.values():
        print(json.dumps({k: v for k, v in result.items() if k != "levels"}))
        for level in result["levels"]:
            print(json.dumps({"backend": result["backend"], **{k: v for k, v in level.items() if k != "texts"}}))
    if set(results) == set(BACKENDS):
        hf, llama = results["transformers"], results["llama_cpp"]
        alone = [r["levels"][0]["tokens_per_s_per_answer"] for r in (hf, llama)]
        burst = next((level for level in llama["levels"] if level["customers"] == 20), None)
        summary = {
            "decode_speedup_one_customer": round(alone[1] / alone[0], 2),
            "throughput_speedup_per_level": [round(b["tokens_per_s_all"] / a["tokens_per_s_all"], 2)
                                             for a, b in zip(hf["levels"], llama["levels"])],
            "label_f1_difference": round(llama["label_f1"] - hf["label_f1"], 4),
            "identical_answers": f"{sum(a == b for a, b in zip(hf['levels'][0]['texts'], llama['levels'][0]['texts']))}/{count}",
            "targets": {
                "decode >= 5x": alone[1] >= 5 * alone[0],
                "p99 first token < 2 s at 20 customers": None if burst is None else burst["first_token_p99_s"] < 2.0,
                "label F1 within 0.01": abs(llama["label_f1"] - hf["label_f1"]) <= 0.01,
            },
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
