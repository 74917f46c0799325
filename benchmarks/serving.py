"""Serving speed: the transformers backend vs the llama.cpp backend on the default model.

Both answer the same pack questions through the chat path (``ChatService``), in the same run, one
after the other; it prints time to first token and decode tokens/s of each (tokens after the first
over the time after the first), the ratio, and how many greedy answers are word for word the same.
With ``--lora`` both serve a random LoRA adapter on every projection (r=16, as big as a trained
one; the llama.cpp side converts it to a GGUF LoRA first).

    .venv/bin/python benchmarks/serving.py [--questions 5] [--max-new-tokens 96] [--lora] [--quantization none]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-bench-serving-"))

from assistant import paths  # noqa: E402

paths.configure_environment()

from assistant import adapters  # noqa: E402
from assistant.chat import ChatService, make_backend  # noqa: E402
from assistant.config import ServeConfig  # noqa: E402


def pack_questions(count: int) -> list[str]:
    rows = [json.loads(line) for line in (paths.pack_dir("peach_state_bank") / "qa.jsonl").read_text().splitlines() if line]
    return [row["question"] for row in rows[:count]]


def make_lora() -> str:
    """The random r=16 LoRA on every projection that benchmarks/serve.py measures, put in service."""
    from serve import make_adapter  # benchmarks/ is this script's folder, first on sys.path

    version = make_adapter()
    adapters.set_current(version, "benchmark")
    return version


def measure(backend_name: str, questions: list[str], max_new_tokens: int, quantization: str) -> dict:
    cfg = ServeConfig(backend=backend_name, device="cpu", max_new_tokens=max_new_tokens, quantization=quantization)
    started = time.perf_counter()
    backend = make_backend(cfg)
    load_s = time.perf_counter() - started
    service = ChatService(cfg, backend)
    "".join(service.answer("Hello"))  # warm-up: first-call allocations are not serving speed
    answers, rates, firsts = [], [], []
    for question in questions:
        stream = service.answer(question)
        answers.append("".join(stream).strip())
        stats = stream.stats
        firsts.append(stats.first_token_s)
        if stats.tokens_out > 1:
            rates.append((stats.tokens_out - 1) / (stats.latency_s - stats.first_token_s))
    return {
        "backend": backend_name,
        "quantization": quantization if backend_name == "transformers" else "GGUF as shipped (Q4_1)",
        "adapter": getattr(backend, "active", None),
        "load_s": round(load_s, 2),
        "first_token_s": round(statistics.median(firsts), 3),
        "decode_tokens_per_s": round(statistics.median(rates), 1),
        "answers": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=5, help="pack questions to answer (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest answer (default 96, as served)")
    parser.add_argument("--lora", action="store_true", help="serve a random LoRA adapter on both backends")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"],
                        help="the transformers side: nf4 as served (default), or none: fp32, the GGUF's exact weights")
    args = parser.parse_args()
    if args.lora:
        make_lora()
    questions = pack_questions(args.questions)
    results = [measure(name, questions, args.max_new_tokens, args.quantization) for name in ("transformers", "llama_cpp")]
    hf, llama = results
    same = sum(a == b for a, b in zip(hf["answers"], llama["answers"]))
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "answers"}))
    print(json.dumps({
        "decode_speedup_llama_cpp_over_transformers": round(llama["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 2),
        "identical_answers": f"{same}/{len(questions)}",
    }))
    for question, a, b in zip(questions, hf["answers"], llama["answers"]):
        if a != b:
            print(json.dumps({"question": question, "transformers": a, "llama_cpp": b}))


if __name__ == "__main__":
    main()
