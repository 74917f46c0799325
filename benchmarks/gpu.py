"""The nightly job's GPU work against what a user would write: one table of training throughput
(tuneloop's trainer at its CPU settings and at its device defaults, HF ``Trainer`` with its defaults
+ PEFT, a plain PyTorch + PEFT loop; same examples, batch and LoRA) at the shipped model's shape and
a 7B shape, and the evaluation path's generation (padded batches against continuous batching).

    python benchmarks/gpu.py                      # on a CUDA machine: 135M and 7B shapes
    python benchmarks/gpu.py --tiny               # anywhere: a tiny random Llama (what the test runs)
    python benchmarks/gpu.py --tokenizer DIR      # a saved tokenizer where the bundled GGUF is absent

Weights are random (a ``LlamaConfig`` of the shape; nothing is downloaded): speed depends on
shapes and lengths, not on weight values. The examples are the Peach State Bank pack's questions
and answers under its persona, encoded by tuneloop's chat template code, so every variant trains
on the same token rows. Unquantized LoRA everywhere (bitsandbytes is not on every GPU machine;
QLoRA's speed is its own question). Examples per second count optimizer-step time only, every step
included, so a variant's one-time compilation or warm-up counts against it. Ratios are against HF
``Trainer`` measured in the same run.

Generation: the pack's test-sized question set through :class:`evals.evaluate.ModelRunner`, padded
batches of 16 and then continuous batching, greedy, no repetition penalty (continuous batching
drops it), at the shipped shape; the count of questions whose answers agree is printed beside.
The whole ``tuneloop retrain`` on CUDA is ``benchmarks/gpu_check.py --pack-snapshot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TUNELOOP_HOME", tempfile.mkdtemp(prefix="tuneloop-gpu-bench-"))

from assistant import paths  # noqa: E402

paths.configure_environment()

PACK = Path(__file__).resolve().parents[1] / "assistant" / "packs" / "peach_state_bank"

# Shapes (vocabulary: the tokenizer's, so the pack's token ids fit every shape).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
VARIANTS = ("hf-trainer", "plain-loop", "tuneloop-cpu-settings", "tuneloop")


def load_tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from assistant.model import bundled_gguf

    gguf = bundled_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def random_llama(shape: str, tokenizer, device: str):
    """A Llama of ``shape`` with seeded random weights, built on ``device`` (bf16 on CUDA, as
    tuneloop loads an unquantized base there; fp32 on a CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=shape != "7b", **SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model.eval()


def pack_examples(tokenizer, n: int) -> tuple[list[dict], str]:
    from trainer import data

    persona = (PACK / "persona.txt").read_text(encoding="utf-8").strip()
    rows = [json.loads(line) for line in (PACK / "qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    encoded, _ = data.encode_rows(tokenizer, persona, rows[:n], max_length=512)
    return encoded, persona


def train_variant(variant: str, shape: str, tokenizer, examples: list[dict], steps: int, batch: int, device: str) -> dict:
    """Train ``steps`` optimizer steps of ``batch`` examples; seconds of step time and what it saw."""
    import torch

    from trainer.config import TrainConfig, resolve
    from trainer.loop import StepTimer
    from trainer.model import for_device, prepare_for_training

    settings = {"tuneloop-cpu-settings": dict(share_prefix="on", group_by_length="on")}.get(variant, {})
    cfg = for_device(resolve(TrainConfig(base_model="random", system_prompt="unused", method="lora", device=device,
                                         max_steps=steps, epochs=100, batch_size=batch, eval_steps=100_000, patience=0,
                                         replay=0.0, progress=False, **settings)))
    model = prepare_for_training(random_llama(shape, tokenizer, device), cfg, f"random-{shape}")
    real_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if variant.startswith("tuneloop"):
        from trainer.loop import fit

        outcome = fit(cfg, tokenizer, model, examples, examples[:batch])
        seconds, done = outcome.train_seconds, outcome.steps
    elif variant == "hf-trainer":
        seconds, done = _hf_trainer(cfg, tokenizer, model, examples, steps, batch, device, StepTimer())
    else:
        seconds, done = _plain_loop(cfg, tokenizer, model, examples, steps, batch, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "shape": shape, "steps": done, "seconds": round(seconds, 3),
            "examples_per_s": round(done * batch / seconds, 2) if seconds else 0.0,
            "share_prefix": cfg.share_prefix if variant.startswith("tuneloop") else "off",
            "group_by_length": cfg.group_by_length if variant.startswith("tuneloop") else "off",
            "precision": cfg.precision, "mean_tokens": round(real_tokens, 1),
            "peak_gib": None if peak is None else round(peak, 2)}


def _collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    # What a user writes first: pad each batch to its longest row, labels padded with -100.
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def _hf_trainer(cfg, tokenizer, model, examples, steps, batch, device, timer) -> tuple[float, int]:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=cfg.lr, bf16=cfg.precision == "bf16", use_cpu=device != "cuda",
                                 report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                                 seed=cfg.seed, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=_collator(tokenizer),
                          callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its summary line would go to stdout, into --json
        trainer.train()
        return timer.seconds, trainer.state.global_step


def _plain_loop(cfg, tokenizer, model, examples, steps, batch, device) -> tuple[float, int]:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(examples, batch_size=batch, shuffle=True, collate_fn=_collator(tokenizer),
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  fused=device == "cuda")
    model.train()
    seconds, done = 0.0, 0
    while done < steps:
        for rows in loader:
            started = time.perf_counter()
            rows = {k: v.to(device) for k, v in rows.items()}
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = model(**rows).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            done += 1
            if done == steps:
                break
    return seconds, done


def generation(shape: str, tokenizer, questions: list[str], persona: str, max_new_tokens: int, device: str) -> dict:
    """The evaluation path's tokens per second: padded batches of 16, then continuous batching."""
    from assistant.config import ServeConfig
    from evals import evaluate

    folder = paths.models_dir() / f"random-{shape}"
    random_llama(shape, tokenizer, "cpu").save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    serve = ServeConfig(base_model=str(folder), quantization="none", device=device, max_new_tokens=max_new_tokens,
                        repetition_penalty=1.0, system_prompt=persona)
    runner = evaluate.ModelRunner(serve, continuous=False)
    conversations = [[{"role": "system", "content": persona}, {"role": "user", "content": q}] for q in questions]
    figures, answers = {}, {}
    for engine in ("padded", "continuous"):
        runner.continuous = engine == "continuous"
        started = time.perf_counter()
        out = runner.generate(conversations, None, batch_size=16)
        seconds = time.perf_counter() - started
        answers[engine] = [g.text for g in out]
        figures[engine] = {"seconds": round(seconds, 2), "tokens": sum(g.tokens_out for g in out),
                           "tokens_per_s": round(sum(g.tokens_out for g in out) / seconds, 1)}
    same = sum(a == b for a, b in zip(answers["padded"], answers["continuous"]))
    return {"shape": shape, "questions": len(questions), "max_new_tokens": max_new_tokens, **figures,
            "same_answers": same, "speedup": round(figures["continuous"]["tokens_per_s"] / figures["padded"]["tokens_per_s"], 2)}


def machine() -> dict:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, few steps: runs anywhere in a minute")
    parser.add_argument("--shapes", help="comma-separated of " + ",".join(SHAPES) + " (default: 135m,7b on CUDA; tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 30; 4 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step, the same for every variant")
    parser.add_argument("--examples", type=int, default=240, help="pack examples trained on")
    parser.add_argument("--questions", type=int, help="questions generated (default 115, the pack's test split size; 6 with --tiny)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per generated answer (default 96, as served; 8 with --tiny)")
    parser.add_argument("--tokenizer", help="a saved tokenizer folder (default: the bundled SmolLM2 GGUF's)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: this benchmark measures a GPU; --tiny runs its code on this CPU", file=sys.stderr)
        return 2
    shapes = (args.shapes or ("tiny" if args.tiny else "135m,7b")).split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        print(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.tiny else 30)
    tokenizer = load_tokenizer(args.tokenizer)
    examples, persona = pack_examples(tokenizer, args.examples)
    started = time.perf_counter()
    training = []
    for shape in shapes:
        for variant in VARIANTS:
            training.append(train_variant(variant, shape, tokenizer, examples, steps, args.batch_size, device))
            print(f"  {shape} {variant}: {training[-1]['examples_per_s']} examples/s", file=sys.stderr, flush=True)
        baseline = next(r for r in training if r["shape"] == shape and r["variant"] == "hf-trainer")
        for row in training:
            if row["shape"] == shape:
                row["vs_hf_trainer"] = round(row["examples_per_s"] / baseline["examples_per_s"], 2)
    questions = [json.loads(line)["question"] for line in (PACK / "qa.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip()][: args.questions or (6 if args.tiny else 115)]
    generated = generation(shapes[0], tokenizer, questions, persona, args.max_new_tokens or (8 if args.tiny else 96), device)
    result = {"machine": machine(), "device": device, "batch_size": args.batch_size, "steps": steps,
              "training": training, "generation": generated, "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    info = result["machine"]
    print(f"{info['gpu'] or 'CPU (' + str(info['threads']) + ' threads)'}; torch {info['torch']}, transformers "
          f"{info['transformers']}, peft {info['peft']}; LoRA r=16 on all projections, batch {args.batch_size}, "
          f"{steps} steps, pack examples of {training[0]['mean_tokens']} tokens on average")
    print(f"{'shape':<6} {'variant':<22} {'prefix':<6} {'grouped':<7} {'prec':<5} {'examples/s':>10} {'vs HF Trainer':>13} {'peak GiB':>8}")
    for r in training:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['shape']:<6} {r['variant']:<22} {r['share_prefix']:<6} {r['group_by_length']:<7} {r['precision']:<5} "
              f"{r['examples_per_s']:>10.2f} {r['vs_hf_trainer']:>12.2f}x {peak:>8}")
    g = generated
    print(f"generation, {g['shape']} shape, {g['questions']} questions x up to {g['max_new_tokens']} tokens: padded batches "
          f"{g['padded']['tokens_per_s']} tokens/s ({g['padded']['seconds']} s), continuous batching "
          f"{g['continuous']['tokens_per_s']} tokens/s ({g['continuous']['seconds']} s): {g['speedup']}x; "
          f"same answers {g['same_answers']}/{g['questions']}")
    print(f"total {result['seconds']} s")
    return 0 if all(math.isfinite(r["examples_per_s"]) for r in training) else 1


if __name__ == "__main__":
    sys.exit(main())
