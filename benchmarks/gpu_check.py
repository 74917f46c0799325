"""GPU path check: CUDA 4-bit (nf4, bf16 compute) serving, QLoRA training in its own process, the
hot swap of the trained adapter, and the gate's evaluation (batched generation, few-shot baseline,
perplexity) on CUDA, in one short run. Prints one JSON line per stage and a verdict.

    python benchmarks/gpu_check.py                       # the configured base model
    python benchmarks/gpu_check.py --tiny TOKENIZER_DIR  # a small random Llama with that tokenizer
    python benchmarks/gpu_check.py --pack-snapshot DIR   # also the pack's default recipe on CUDA

``--tiny`` exists for machines the real weights cannot be copied to; it exercises the same code.
``--pack-snapshot`` takes the dataset folder ``tuneloop init`` made elsewhere (``datasets/d0001``) and
trains the nightly job's default recipe on it with QLoRA on CUDA, the pack's persona and the gate's
forgetting curve included. The adapter it writes can be copied back and scored on the same test
questions with ``tuneloop eval --adapter VERSION`` where the answer labeler is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-gpu-check-"))

from assistant import paths  # noqa: E402

paths.configure_environment()

PACK_QA = Path(__file__).resolve().parents[1] / "assistant" / "packs" / "peach_state_bank" / "qa.jsonl"


def tiny_llama(tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = paths.models_dir() / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_snapshot(n_train: int = 96, n_val: int = 24) -> Path:
    rows = [json.loads(line) for line in PACK_QA.read_text(encoding="utf-8").splitlines()]
    folder = paths.datasets_dir() / "d0001"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:n_train + 2 * n_val]}
    for name, part in splits.items():
        lines = [json.dumps({"id": f"pack:{i}", "question": r["question"], "answer": r["answer"],
                             "label": r["label"], "source": "pack"}) for i, r in enumerate(part)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"version": "d0001", "counts": {k: len(v) for k, v in splits.items()}}))
    return folder


def evaluate_on_cuda(cfg, adapter: str, n: int = 16) -> dict:
    """The evaluation the gate runs, on CUDA: batched left-padded generation of base, few-shot base
    and candidate on one loaded 4-bit base, and general-text perplexity with and without the adapter.
    The test rows carry no labels, so answer F1 is the metric (the labeler's embedding model is a
    package of its own that need not be on a GPU machine)."""
    import math

    from evals import evaluate
    from evals.gate import GateConfig, general_texts

    rows = [json.loads(line) for line in (paths.datasets_dir() / "d0001" / "test.jsonl").read_text().splitlines()]
    test_file = paths.home() / "gpu-check-test.jsonl"
    test_file.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows[:n]))
    started = time.perf_counter()
    runner = evaluate.ModelRunner(cfg)
    report = evaluate.main(evaluate.EvalConfig(adapter=adapter, dataset=str(test_file), baselines=True, few_shot_k=2,
                                               batch_size=8), cfg, runner=runner)
    texts = general_texts(GateConfig())[:8]
    perplexity = {"base": runner.perplexity(texts, None), "candidate": runner.perplexity(texts, adapter)}
    systems = {"candidate": report, **report.baselines}
    figures = {name: r.answer_f1 for name, r in systems.items()}
    return {
        "stage": "evaluate_cuda",
        "ok": (runner.model.device.type == "cuda" and report.n == n and report.metric == "answer_f1"
               and all(0.0 <= f <= 1.0 for f in figures.values()) and all(math.isfinite(v) for v in perplexity.values())
               and report.baselines["few_shot"].prompt_tokens > report.baselines["base"].prompt_tokens),
        "model_device": str(runner.model.device),
        "n": report.n,
        "answer_f1": {k: round(v, 4) for k, v in figures.items()},
        "perplexity": {k: round(v, 2) for k, v in perplexity.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def train_pack_recipe(base: str, snapshot: Path) -> dict:
    """The nightly job's default recipe (QLoRA, every other field as ``tuneloop retrain`` sets it)
    on a pack snapshot, on CUDA, in its own process."""
    from tuneloop import pipeline
    from evals.gate import GateConfig
    from feedback.packs import load_pack
    from trainer.config import TrainConfig
    from trainer.train import train_in_subprocess

    cfg = TrainConfig(base_model=base, method="qlora", device="cuda", dataset=str(snapshot.resolve()),
                      system_prompt=load_pack().persona, progress=False)
    cfg = dataclasses.replace(cfg, **pipeline.forgetting_settings(cfg, GateConfig()))
    started = time.perf_counter()
    trained = train_in_subprocess(cfg)
    provenance = json.loads((Path(trained.path) / "provenance.json").read_text(encoding="utf-8"))
    return {
        "stage": "pack_recipe_cuda",
        "ok": trained.val_loss < trained.base_val_loss and provenance["device"] == "cuda",
        "adapter": trained.adapter,
        "path": trained.path,
        "precision": provenance.get("train_config", {}).get("precision"),
        "train_examples": trained.train_examples,
        "replay_examples": trained.replay_examples,
        "base_val_loss": round(trained.base_val_loss, 4),
        "val_loss": round(trained.val_loss, 4),
        "best_step": trained.best_step,
        "steps": trained.steps,
        "stopped_early": trained.stopped_early,
        "tokens_per_s": round(trained.tokens_per_s, 1),
        "train_minutes": round(trained.seconds / 60, 2),
        "minutes_with_process": round((time.perf_counter() - started) / 60, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, help="tokenizer folder for a small random Llama instead of the real base")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--pack-snapshot", type=Path, help="also train the default recipe on this dataset snapshot")
    args = parser.parse_args()
    if args.pack_snapshot and not (args.pack_snapshot / "manifest.json").is_file():
        parser.error(f"{args.pack_snapshot} is not a dataset snapshot: manifest.json is missing")

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"stage": "cuda", "ok": False, "error": "no CUDA device visible"}))
        return 1
    import bitsandbytes as bnb

    from assistant import adapters
    from assistant.chat import ChatService, TransformersBackend
    from assistant.config import ServeConfig
    from trainer.config import TrainConfig, resolve_configs
    from trainer.train import train_in_subprocess

    results = []
    base = str(tiny_llama(args.tiny)) if args.tiny else ServeConfig().base_model
    cfg = ServeConfig(base_model=base, quantization="nf4", device="cuda", max_new_tokens=48)

    started = time.perf_counter()
    backend = TransformersBackend(cfg)
    load_s = time.perf_counter() - started
    layers = [m for m in backend.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    service = ChatService(cfg, backend)
    stream = service.answer("How do I send a wire transfer?")
    base_text = "".join(stream)
    stage = {
        "stage": "serve_nf4_cuda",
        "ok": bool(layers) and layers[0].weight.device.type == "cuda" and layers[0].compute_dtype == torch.bfloat16,
        "linear4bit_layers": len(layers),
        "weight_device": str(layers[0].weight.device) if layers else None,
        "compute_dtype": str(layers[0].compute_dtype) if layers else None,
        "load_s": round(load_s, 2),
        "tokens_out": stream.stats.tokens_out,
        "decode_tok_s": round((stream.stats.tokens_out - 1) / max(stream.stats.latency_s - (stream.stats.first_token_s or 0), 1e-9), 1),
        "gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }
    results.append(stage)

    write_snapshot()
    started = time.perf_counter()
    running = "qlora_train_cuda_subprocess"  # the stage an exception is reported under
    try:
        train, _ = resolve_configs(TrainConfig(base_model=base, method="qlora", device="cuda", max_steps=args.max_steps,
                                               # 2e-3 for the random tiny model; the real one takes the measured default
                                               eval_steps=10, lr=2e-3 if args.tiny else 0.0, progress=False), cfg)
        trained = train_in_subprocess(train)
        results.append({
            "stage": "qlora_train_cuda_subprocess",
            "ok": trained.val_loss < trained.base_val_loss,
            "adapter": trained.adapter,
            "base_val_loss": round(trained.base_val_loss, 4),
            "val_loss": round(trained.val_loss, 4),
            "steps": trained.steps,
            "tokens_per_s": round(trained.tokens_per_s, 1),
            "seconds": round(time.perf_counter() - started, 1),
        })
        running = "hot_swap_cuda"
        adapters.set_current(trained.adapter, "gpu check")
        stream = service.answer("How do I send a wire transfer?")
        text = "".join(stream)
        results.append({"stage": "hot_swap_cuda", "ok": stream.stats.adapter == trained.adapter and backend.last_error is None,
                        "adapter": stream.stats.adapter, "answer_changed": text != base_text, "answer": text[:120]})
        running = "evaluate_cuda"
        results.append(evaluate_on_cuda(cfg, trained.adapter))
    except Exception as exc:  # report every stage, then fail
        results.append({"stage": running, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for item in results:  # the short check first: the pack's recipe takes minutes
        print(json.dumps(item), flush=True)
    if args.pack_snapshot:
        try:
            results.append(train_pack_recipe(base, args.pack_snapshot))
        except Exception as exc:
            results.append({"stage": "pack_recipe_cuda", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results[-1]), flush=True)
    ok = all(item["ok"] for item in results)
    print(json.dumps({"stage": "verdict", "ok": ok, "device": torch.cuda.get_device_name(0),
                      "torch": torch.__version__, "bitsandbytes": bnb.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
