"""Serving overhead: tuneloop's chat path vs plain ``model.generate`` on the same model and prompts.

For each quantization (nf4, none) it loads the default base plus a LoRA adapter (r=16 on every
projection, random weights, as big as a trained one) and prints load time, memory, time to first
token and decode tokens/s of both paths, measured in the same run, and the ratio.
Target: tuneloop's overhead <= 1.10x.

With ``--hints K`` the adapter also carries topic hints (assistant/hints.py: a question classifier
fitted on the shipped pack's questions): the chat path classifies each question and puts its K
likely topics in the prompt; plain generate gets the same hinted prompt, built outside its timing,
so the ratio is what classifying costs per answer.

    .venv/bin/python benchmarks/serve.py [--quick] [--hints 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-bench-serve-"))

from assistant import paths  # noqa: E402

paths.configure_environment()

import torch  # noqa: E402

from assistant import adapters  # noqa: E402
from assistant.chat import ChatService, TransformersBackend, build_messages  # noqa: E402
from assistant.config import ServeConfig  # noqa: E402
from assistant.hints import TopicHints  # noqa: E402
from assistant.model import load_base, prepare  # noqa: E402

PROMPTS = [
    "What is a lien?",
    "How do I send a wire transfer abroad?",
    "Can I get overdraft protection on my checking account?",
    "what's the interest rate on savings",
    "I lost my debit card, what should I do?",
    "How long does a mortgage pre-approval take?",
]


def make_adapter(hints: int = 0) -> str:
    """A random LoRA adapter over every projection, saved as the trainer saves one (with topic
    hints fitted on the pack's questions when ``hints``)."""
    from peft import LoraConfig, get_peft_model

    info = prepare()
    _, model = load_base(info, "none", "cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 1e-3)
    version = adapters.new_version()
    folder = adapters.adapter_path(version)
    peft_model.save_pretrained(folder, safe_serialization=True)
    if hints:
        rows = [json.loads(line) for line in (paths.pack_dir("peach_state_bank") / "qa.jsonl").read_text().splitlines() if line]
        TopicHints.fit([r["question"] for r in rows], [r["label"] for r in rows], hints).save(folder)
    paths.write_json_atomic(folder / adapters.PROVENANCE_FILE,
                            {"base_model": info.model_id, "base_model_sha256": info.sha256, "method": "benchmark"})
    adapters.set_current(version, "benchmark")
    return version


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(quantization: str, max_new_tokens: int, rounds: int) -> dict:
    cfg = ServeConfig(quantization=quantization, device="cpu", max_new_tokens=max_new_tokens)
    before = rss_mb()
    started = time.perf_counter()
    backend = TransformersBackend(cfg)
    load_s = time.perf_counter() - started
    service = ChatService(cfg, backend)
    model = backend.peft if backend.active else backend.model
    ours_ttft, ours_tps, base_ttft, base_tps, prompt_tokens = [], [], [], [], []
    "".join(service.answer("warm up"))
    for _ in range(rounds):
        for prompt in PROMPTS:
            stream = service.answer(prompt)
            "".join(stream)
            s = stream.stats
            ours_ttft.append(s.first_token_s)
            prompt_tokens.append(s.tokens_in)
            ours_tps.append((s.tokens_out - 1) / (s.latency_s - s.first_token_s))
            # Plain generate, same model, prompt (hint included), settings and answer length.
            messages = build_messages(cfg.system_prompt, [], prompt)
            if backend.hints is not None:
                messages = backend.on_model_thread(backend.hints.apply, [messages])[0]
            inputs = backend.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            common = dict(do_sample=False, repetition_penalty=cfg.repetition_penalty,
                          pad_token_id=backend.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            # On the backend's model thread, like the chat path: a second thread running torch
            # ops would slow both (see TransformersBackend).
            def plain(new_tokens: int):
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)
                return out, time.perf_counter() - t0

            _, first = backend.on_model_thread(plain, 1)
            out, full = backend.on_model_thread(plain, s.tokens_out)
            produced = out.shape[1] - inputs["input_ids"].shape[1]
            base_ttft.append(first)
            base_tps.append((produced - 1) / max(full - first, 1e-9))
    return {
        "quantization": quantization,
        "adapter": backend.active,
        "load_s": load_s,
        "model_mb": backend.model.get_memory_footprint() / 2**20,
        "rss_growth_mb": rss_mb() - before,
        "ours_ttft_s": statistics.median(ours_ttft),
        "plain_ttft_s": statistics.median(base_ttft),
        "ours_tok_s": statistics.median(ours_tps),
        "plain_tok_s": statistics.median(base_tps),
        "prompt_tokens": statistics.median(prompt_tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of prompts, 32 new tokens")
    parser.add_argument("--hints", type=int, default=0, help="give the adapter topic hints with K labels (0 = none)")
    args = parser.parse_args()
    rounds, max_new = (1, 32) if args.quick else (2, 64)
    torch.set_num_threads(os.cpu_count() or 1)
    # In a thread that ends: the main thread must not keep an OpenMP team of its own (see
    # TransformersBackend); a finished thread's team goes with it.
    with ThreadPoolExecutor(max_workers=1) as once:
        version = once.submit(make_adapter, args.hints).result()
    print(f"base: {prepare().model_id}  adapter: {version} (r=16, all projections, topic hints: {args.hints or 'none'})  "
          f"threads: {torch.get_num_threads()}")
    print(f"{len(PROMPTS)} prompts x {rounds} rounds, greedy, up to {max_new} new tokens, medians")
    for quantization in ("nf4", "none"):
        r = measure(quantization, max_new, rounds)
        ttft_ratio = r["ours_ttft_s"] / r["plain_ttft_s"]
        tps_ratio = r["plain_tok_s"] / r["ours_tok_s"]
        print(
            f"{quantization:>4}: load {r['load_s']:.1f}s, model {r['model_mb']:.0f} MiB, RSS +{r['rss_growth_mb']:.0f} MiB, "
            f"prompt {r['prompt_tokens']:.0f} tokens | "
            f"TTFT tuneloop {r['ours_ttft_s']*1000:.0f} ms vs plain {r['plain_ttft_s']*1000:.0f} ms (x{ttft_ratio:.2f}) | "
            f"decode tuneloop {r['ours_tok_s']:.1f} tok/s vs plain {r['plain_tok_s']:.1f} tok/s (overhead x{tps_ratio:.2f}) "
            f"[{'meets' if max(ttft_ratio, tps_ratio) <= 1.10 else 'misses'} <= 1.10x]"
        )


if __name__ == "__main__":
    main()
