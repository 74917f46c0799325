"""The trainer: loss mask, training effects, early stopping, artifacts, serving, determinism, refusals."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from assistant import adapters, paths
from assistant.config import ConfigError, ServeConfig
from trainer import data
from trainer.config import DEFAULT_LR, TrainConfig, resolve
from trainer.loop import KeepBest, fit
from trainer.model import (TrainError, bnb_trap_guard, disable_cpu_inference_repack, effective_precision, for_device,
                           load_for_training, prepare_for_training)
from trainer.train import main, train_in_subprocess

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You answer bank customers in one sentence."
TOPICS = ["card", "PIN", "transfer", "refund", "account", "fee", "loan", "app"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from more threads, and on a shared CPU spin-waiting OpenMP threads
    made these tests about 3x slower (child processes get the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def write_snapshot(n_train: int, n_val: int, name: str = "d0001", val_answer: str | None = None) -> Path:
    """A snapshot in the curation format, under $TUNELOOP_HOME/datasets/<name>."""
    folder = paths.datasets_dir() / name
    folder.mkdir(parents=True)
    count = 0

    def rows(n: int, answer: str | None) -> list[dict]:
        nonlocal count
        out = []
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            question = f"How do I sort out my {topic}?" + " Please help." * (i % 3)
            out.append({
                "id": f"r{count}",
                "question": question,
                "answer": answer or f"Open the app and choose {topic} settings.",
                "label": topic,
                "source": "test",
            })
            count += 1
        return out

    for split, split_rows in (("train", rows(n_train, None)), ("val", rows(n_val, val_answer)), ("test", rows(2, None))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"version": name, "counts": {"train": n_train, "val": n_val}}), encoding="utf-8")
    return folder


def tiny_cfg(tiny_model_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        base_model=str(tiny_model_dir),
        system_prompt=SYSTEM,
        device="cpu",
        batch_size=4,
        epochs=1,
        min_train_examples=8,
        replay=0.0,  # tests/test_replay.py covers replay; here it would only add sampling time
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def encoded(tiny_model_dir: Path, n: int, answer: str | None = None) -> list[dict]:
    tokenizer = tokenizer_of(tiny_model_dir)
    rows = [{"question": f"How do I sort out my {TOPICS[i % 8]}?", "answer": answer or f"Choose {TOPICS[i % 8]} settings."} for i in range(n)]
    return data.encode_rows(tokenizer, SYSTEM, rows, 512)[0]


# --- the loss mask ---------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(tiny_model_dir):
    from assistant.chat import build_messages

    tokenizer = tokenizer_of(tiny_model_dir)
    answer = "Your new card arrives within 3 working days."
    example = data.encode_example(tokenizer, SYSTEM, "Where is my card?", answer)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == len(example["attention_mask"])
    learned = [i for i, label in zip(ids, labels) if label != data.IGNORE]
    assert [label for label in labels if label != data.IGNORE] == learned
    assert tokenizer.decode(learned) == answer + tokenizer.eos_token == answer + "<|im_end|>"
    # Everything before the answer is the served prompt (same system prompt, same template), masked.
    first = next(i for i, label in enumerate(labels) if label != data.IGNORE)
    served = tokenizer.apply_chat_template(build_messages(SYSTEM, [], "Where is my card?"), add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids[:first]) == served
    assert all(label == data.IGNORE for label in labels[:first])
    assert all(label != data.IGNORE for label in labels[first:])


def test_collator_pads_each_batch_to_its_longest_example_only():
    collate = data.PadCollator(pad_id=2)
    short = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}
    long = {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, 7, 8, 9]}
    batch = collate([short, long])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 2, 2]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 6, 7, -100, -100]
    assert data.PadCollator(pad_id=2, pad_to=9)([short])["input_ids"].shape == (1, 9)


def test_collator_splits_off_the_prefix_every_example_shares_before_the_answer():
    collate = data.PadCollator(pad_id=2, share_prefix=True)
    a = {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 8, 9]}
    b = {"input_ids": [5, 6, 7, 3], "attention_mask": [1] * 4, "labels": [-100, -100, -100, 3]}
    batch = collate([a, b])
    # [5, 6, 7] is common, but 7 predicts the first answer token: it stays with each row.
    assert batch["prefix_ids"].tolist() == [[5, 6]]
    assert batch["input_ids"].tolist() == [[7, 8, 9], [7, 3, 2]]
    assert batch["labels"].tolist() == [[-100, 8, 9], [-100, 3, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]  # full width
    different = {"input_ids": [4, 6, 7, 3], "attention_mask": [1] * 4, "labels": [-100, -100, -100, 3]}
    assert "prefix_ids" not in collate([a, different])
    assert "prefix_ids" not in data.PadCollator(pad_id=2)([a, b])


def lora_trainer(tiny_model_dir: Path, **overrides):
    """A fresh LoRA model (fp32, no dropout: deterministic losses) and a LoopTrainer around it."""
    from transformers import TrainingArguments

    from assistant import model as base_models
    from trainer.loop import LoopTrainer

    cfg = resolve(tiny_cfg(tiny_model_dir, method="lora", lora_dropout=0.0, precision="fp32", **overrides))
    tokenizer, model = load_for_training(base_models.prepare(cfg.base_model), cfg)
    args = TrainingArguments(output_dir=str(paths.home() / "scratch"), use_cpu=True, report_to="none")
    return tokenizer, model, LoopTrainer(model=model, args=args, neftune_alpha=cfg.neftune_alpha)


def test_shared_prefix_gives_the_same_loss_and_gradients_as_the_whole_batch(tiny_model_dir):
    tokenizer, model, trainer = lora_trainer(tiny_model_dir)
    examples = encoded(tiny_model_dir, 4)
    shared = data.shared_prefix_length(examples)
    served = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=False)
    assert tokenizer.decode(examples[0]["input_ids"][:shared]).startswith(served)
    results = {}
    for share in (False, True):
        model.zero_grad()
        batch = data.PadCollator(tokenizer.pad_token_id, share_prefix=share)(examples)
        assert ("prefix_ids" in batch) == share
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[share] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        assert torch.allclose(results[True][1][name], grad, rtol=1e-4, atol=1e-6), name
    # Not vacuous: every LoRA B matrix got a gradient, so the equality above compared real gradients.
    assert all(grad.abs().sum() > 0 for name, grad in results[True][1].items() if "lora_B" in name)


def test_neftune_noise_is_scaled_by_the_whole_row_and_only_perturbs_domain_batches_in_training(tiny_model_dir):
    from trainer import replay

    alpha = 5.0
    tokenizer, model, trainer = lora_trainer(tiny_model_dir, neftune_alpha=alpha)
    embeddings = model.get_input_embeddings()
    noise = []  # per forward through the embeddings: (largest deviation from the clean embeddings, tokens)
    embeddings.register_forward_hook(  # runs after the noise hook, so it sees what the model sees
        lambda module, inputs, output: noise.append(((output - module.weight[inputs[0]]).abs().max().item(), inputs[0].shape[1])))
    collate = data.PadCollator(tokenizer.pad_token_id, share_prefix=True)
    batch = collate(encoded(tiny_model_dir, 4))
    width, dim = batch["attention_mask"].shape[1], embeddings.weight.shape[1]
    bound = alpha / math.sqrt(width * dim)

    model.train()
    trainer.compute_loss(model, dict(batch))
    # Two forwards, the shared prefix and the rest of the rows, both with the noise of the whole row
    # (splitting off the prefix changes nothing): uniform in [-bound, bound], so the largest of
    # hundreds of draws is close to the bound.
    assert [tokens for _, tokens in noise] == [batch["prefix_ids"].shape[1], batch["input_ids"].shape[1]]
    assert all(0.9 * bound < largest <= bound * (1 + 1e-6) for largest, _ in noise), (noise, bound)
    assert trainer._noise_length == 0, "no noise outside a training batch (the forgetting curve's forwards)"

    noise.clear()
    rows = replay.encode_texts(tokenizer, ["The river floods every spring.", "Bread rises in a warm kitchen."], 64, distil=True)
    trainer.compute_loss(model, collate(rows))
    assert noise and all(largest == 0 for largest, _ in noise), "replay rows and their base target stay clean"

    noise.clear()
    model.eval()
    trainer.compute_loss(model, dict(batch))
    assert noise and all(largest == 0 for largest, _ in noise), "validation sees clean embeddings"


def test_training_with_neftune_records_it_and_still_learns(tiny_model_dir):
    write_snapshot(16, 4)
    result = main(tiny_cfg(tiny_model_dir, neftune_alpha=5.0))
    provenance = json.loads((Path(result.path) / "provenance.json").read_text())
    assert provenance["train_config"]["neftune_alpha"] == 5.0
    assert math.isfinite(result.train_loss) and result.val_loss < result.base_val_loss
    with pytest.raises(ConfigError, match="neftune_alpha"):
        TrainConfig(neftune_alpha=-1.0)


# --- config ----------------------------------------------------------------------------------------


def test_config_range_checks_and_resolution_from_the_serve_config():
    with pytest.raises(ConfigError, match="method must be one of"):
        TrainConfig(method="adapterx")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="target_modules"):
        TrainConfig(target_modules=" , ")
    cfg = resolve(TrainConfig(), ServeConfig(quantization="nf4", system_prompt="Be a bank."))
    assert (cfg.method, cfg.lr, cfg.system_prompt) == ("qlora", DEFAULT_LR["qlora"], "Be a bank.")
    assert cfg.base_model == ServeConfig().base_model
    assert resolve(TrainConfig(), ServeConfig(quantization="none")).method == "lora"
    assert resolve(TrainConfig(method="full", lr=0.5), ServeConfig()).lr == 0.5
    defaults = TrainConfig()
    assert (defaults.lora_r, defaults.lora_alpha, defaults.batch_size, defaults.epochs, defaults.replay) == (16, 32, 8, 5.0, 0.1)
    with pytest.raises(ConfigError, match="replay must be between"):
        TrainConfig(replay=-1)
    assert cfg.replay_loss == "kl" and resolve(TrainConfig(method="full"), ServeConfig()).replay_loss == "tokens"
    assert resolve(TrainConfig(replay_loss="tokens"), ServeConfig()).replay_loss == "tokens"
    with pytest.raises(ConfigError, match="full fine-tuning has no adapter"):
        resolve(TrainConfig(method="full", replay_loss="kl"), ServeConfig())
    with pytest.raises(ConfigError, match="replay_loss must be"):
        TrainConfig(replay_loss="mse")
    with pytest.raises(ConfigError, match="max_perplexity_ratio must be 0"):
        TrainConfig(general_text="g.txt", max_perplexity_ratio=0.5)
    assert defaults.target_list() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- what training must do -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_changes_only_the_adapter(tiny_model_dir, method):
    from assistant import model as base_models

    cfg = resolve(tiny_cfg(tiny_model_dir, method=method, max_steps=3, lr=1e-2))
    tokenizer, model = load_for_training(base_models.prepare(cfg.base_model), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(cfg.target_list())

    fit(cfg, tokenizer, model, encoded(tiny_model_dir, 8), encoded(tiny_model_dir, 4))

    after = dict(model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            continue
        # Bit-identical: the same bytes (4-bit packed weights included), not merely close.
        assert torch.equal(old, after[name].detach()), f"base weight {name} changed"
    assert any(not torch.equal(before[n], after[n].detach()) for n in trainable if "lora_B" in n)
    # Validation ran between steps, yet no 4-bit weight was repacked for the inference-only kernel.
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(state, "packing_format_for_cpu", False)


def test_device_defaults_resolve_per_device_and_explicit_settings_win(monkeypatch, tuneloop_home):
    from assistant import model as base_models
    from assistant.config import load

    cpu = for_device(TrainConfig(device="cpu"))
    assert (cpu.share_prefix, cpu.group_by_length) == ("on", "on") and cpu.precision in ("bf16", "fp32")
    assert for_device(cpu) == cpu  # idempotent: the training process keeps what it was given
    # On CUDA the CPU's batching tricks are off by default (measured slower there), bf16 where supported.
    monkeypatch.setattr(base_models, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = for_device(TrainConfig(device="cuda"))
    assert (cuda.share_prefix, cuda.group_by_length, cuda.precision) == ("off", "off", "bf16")
    assert for_device(TrainConfig(device="cuda", share_prefix="on")).share_prefix == "on"
    # A config file's true/false, and the command line's on/off/yes/no, mean the same.
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    (tuneloop_home / "config.toml").write_text("[train]\nshare_prefix = false\ngroup_by_length = true\n")
    loaded = load(TrainConfig, "train", {"group_by_length": "no"})
    assert (loaded.share_prefix, loaded.group_by_length) == ("off", "off")
    with pytest.raises(ConfigError, match="share_prefix must be 'auto', 'on' or 'off'"):
        TrainConfig(share_prefix="sometimes")


@pytest.mark.parametrize("method, precision, base_dtype", [("lora", "bf16", torch.bfloat16), ("lora", "fp32", torch.float32),
                                                           ("full", "bf16", torch.float32)])
def test_a_bf16_loaded_base_stays_bf16_under_lora_with_fp32_adapter_weights(tiny_model_dir, method, precision, base_dtype):
    """How CUDA loads an unquantized base (bf16), on the CPU: LoRA under bf16 autocast keeps the
    frozen base in bf16; what is trained is fp32 (the adapter, or every weight of a full fine-tune)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    cfg = tiny_cfg(tiny_model_dir, method=method, precision=precision)
    model = prepare_for_training(model, cfg, "tiny")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} <= {base_dtype}


def test_bf16_precision_computes_in_bf16_and_trains_like_fp32(tiny_model_dir):
    from assistant import model as base_models

    with pytest.raises(ConfigError, match="precision must be"):
        TrainConfig(precision="fp16")
    expected = "bf16" if base_models.cpu_has_native_bf16() else "fp32"
    assert effective_precision(TrainConfig(device="cpu")) == expected
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve(tiny_cfg(tiny_model_dir, method="qlora", max_steps=6, lr=1e-2, lora_dropout=0.0, precision=precision))
        tokenizer, model = load_for_training(base_models.prepare(cfg.base_model), cfg)
        assert {m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype")} == {
            torch.bfloat16 if precision == "bf16" else torch.float32}
        # Master weights stay fp32 whatever the compute precision: AdamW in bf16 loses small updates.
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        outcome = fit(cfg, tokenizer, model, encoded(tiny_model_dir, 8), encoded(tiny_model_dir, 4))
        losses[precision] = [entry["loss"] for entry in outcome.history["train"]]
    # Autocast rounds activations, not weights: the same run within bf16 rounding, and it learns.
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05), losses
    assert losses["bf16"][-1] < losses["bf16"][0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_goes_down_when_overfitting_eight_examples(tiny_model_dir, method):
    from assistant import model as base_models

    cfg = resolve(tiny_cfg(
        tiny_model_dir, method=method, batch_size=8, epochs=30, eval_steps=10, lr=5e-2 if method == "lora" else 1e-2,
        lora_dropout=0.0, warmup_ratio=0.0, patience=0,
    ))
    tokenizer, model = load_for_training(base_models.prepare(cfg.base_model), cfg)
    examples = encoded(tiny_model_dir, 8)
    outcome = fit(cfg, tokenizer, model, examples, examples)
    losses = [entry["loss"] for entry in outcome.history["train"]]
    assert outcome.steps == 30 and len(losses) == 30
    # The tiny model's frozen random embeddings cap how confident LoRA can make it (about -0.5 nats
    # from ln(vocab)); full fine-tuning moves the embeddings too and memorises the answers.
    drop = 0.3 if method == "lora" else 0.5 * losses[0]
    assert losses[-1] < losses[0] - drop, losses
    assert outcome.best_val_loss < outcome.base_val_loss - drop


def _state(step: int):
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.global_step = step
    return state, TrainerControl()


def test_early_stopping_stops_on_rising_validation_loss_and_keeps_the_best_weights():
    model = torch.nn.Linear(2, 2)
    keeper = KeepBest(patience=2)
    for step, loss in [(0, 5.0), (10, 3.0), (20, 2.0), (30, 2.5), (40, 2.7)]:
        with torch.no_grad():
            model.weight.fill_(step)  # the weights "at" this validation
        state, control = _state(step)
        keeper.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
        assert control.should_training_stop == (step == 40)
    assert (keeper.best_step, keeper.best_loss, keeper.base_loss) == (20, 2.0, 5.0)
    keeper.restore(model)
    assert torch.all(model.weight == 20)


def test_early_stopping_never_triggers_with_patience_zero_or_on_improvement():
    model = torch.nn.Linear(2, 2)
    for patience, losses in [(0, [3.0, 4.0, 5.0, 6.0]), (2, [3.0, 2.9, 2.8, 2.7])]:
        keeper = KeepBest(patience=patience)
        for step, loss in enumerate(losses, start=1):
            state, control = _state(step)
            keeper.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
            assert not control.should_training_stop


def test_weights_over_the_forgetting_bar_are_not_kept_and_only_validation_loss_stops_training():
    model = torch.nn.Linear(2, 2)
    keeper = KeepBest(patience=2, max_ratio=1.25)
    # (step, val loss, general-text perplexity): the baseline is 40, so the bar is 50. Perplexity
    # crosses the bar while the loss still falls (as at a high learning rate), then the loss rises.
    steps = [(0, 5.0, 40.0), (10, 3.0, 44.0), (20, 2.0, 49.0), (30, 1.5, 60.0), (40, 1.2, 80.0), (50, 1.3, 45.0), (60, 1.4, 46.0)]
    for step, loss, perplexity in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        state, control = _state(step)
        keeper.on_evaluate(None, state, control, metrics={"eval_loss": loss, "eval_general_perplexity": perplexity}, model=model)
        assert control.should_training_stop == (step == 60), step  # two validations above the lowest loss (1.2)
    # 50 is back within the bar with a lower loss than 20: kept, though 40 had the lowest loss.
    assert (keeper.best_step, keeper.best_loss, keeper.within_bar) == (50, 1.3, True)
    assert keeper.best_ratio == pytest.approx(45 / 40)
    keeper.restore(model)
    assert torch.all(model.weight == 50)


def test_when_nothing_is_within_the_forgetting_bar_the_lowest_loss_is_kept_until_something_is():
    model = torch.nn.Linear(2, 2)
    keeper = KeepBest(patience=0, max_ratio=1.1)
    steps = [(0, 5.0, 40.0), (10, 3.0, 50.0), (20, 2.0, 48.0), (30, 2.5, 60.0)]
    for step, loss, perplexity in steps:
        state, control = _state(step)
        keeper.on_evaluate(None, state, control, metrics={"eval_loss": loss, "eval_general_perplexity": perplexity}, model=model)
    assert (keeper.best_step, keeper.within_bar) == (20, False)
    # A later validation within the bar wins even with a higher loss than the fallback.
    state, control = _state(40)
    keeper.on_evaluate(None, state, control, metrics={"eval_loss": 2.8, "eval_general_perplexity": 43.0}, model=model)
    assert (keeper.best_step, keeper.within_bar) == (40, True)
    # Without a bar the perplexity is recorded but never decides.
    free = KeepBest(patience=0)
    for step, loss, perplexity in steps:
        state, control = _state(step)
        free.on_evaluate(None, state, control, metrics={"eval_loss": loss, "eval_general_perplexity": perplexity}, model=model)
    assert (free.best_step, free.within_bar) == (20, None) and free.best_ratio == pytest.approx(48 / 40)


def test_training_records_the_forgetting_curve_and_keeps_weights_within_the_bar(tiny_model_dir, tmp_path):
    general = tmp_path / "general.txt"
    # Words the domain never uses: the more the tiny model learns the domain, the less it expects these.
    general.write_text("The gate checks these.\n\nZebra quartz violin umbrella; 7391 kelp.\nOboe glacier ferret 5520 sonnet.\n")
    write_snapshot(16, 4)
    free = main(tiny_cfg(tiny_model_dir, method="lora", lr=5e-2, epochs=6, eval_steps=4, patience=0,
                         general_text=str(general), general_skip=1))
    history = json.loads((Path(free.path) / "loss_history.json").read_text())
    curve = [entry["general_perplexity"] for entry in history["val"]]
    assert len(curve) == len(history["val"]) >= 6 and curve[-1] > curve[0], curve
    assert free.perplexity_ratio == pytest.approx(history["val"][[e["step"] for e in history["val"]].index(free.best_step)]
                                                  ["general_perplexity"] / curve[0], rel=1e-3)
    assert free.within_perplexity_bar is None
    # The same run (same seed) under a bar that only the least-forgetting validation meets: the
    # weights kept are those, not the lowest validation loss.
    bar = min(curve[1:]) / curve[0]
    expected = min((e for e in history["val"] if e["step"] > 0 and e["general_perplexity"] / curve[0] <= bar),
                   key=lambda e: e["loss"])["step"]
    assert expected != free.best_step
    bounded = main(tiny_cfg(tiny_model_dir, method="lora", lr=5e-2, epochs=6, eval_steps=4, patience=0,
                            general_text=str(general), general_skip=1, max_perplexity_ratio=max(1.0, bar + 1e-6)))
    assert (bounded.best_step, bounded.within_perplexity_bar) == (expected, True), (curve, bar, bounded)
    assert bounded.perplexity_ratio <= bar + 1e-3
    with pytest.raises(data.DatasetError, match="no passages after the first 3"):
        main(tiny_cfg(tiny_model_dir, general_text=str(general), general_skip=3))
    with pytest.raises(ConfigError, match="needs general_text"):
        TrainConfig(max_perplexity_ratio=1.25)


def test_training_stops_early_when_validation_diverges(tiny_model_dir):
    # Validation asks the training questions but expects another answer: the better the model
    # learns the training answers, the worse validation gets.
    write_snapshot(16, 8, val_answer="Zebra quartz violin umbrella.")
    result = main(tiny_cfg(tiny_model_dir, method="full", lr=1e-2, epochs=30, eval_steps=2, patience=2, warmup_ratio=0.0))
    history = json.loads((Path(result.path) / "loss_history.json").read_text())
    assert result.stopped_early and result.steps < 120
    val = [entry["loss"] for entry in history["val"] if entry["step"] > 0]
    assert result.best_step < result.steps and result.val_loss == pytest.approx(min(val), abs=1e-4)
    assert val[-1] > result.val_loss


# --- the adapter folder, served ----------------------------------------------------------------------


def test_trained_adapter_has_provenance_is_accepted_and_served(tiny_model_dir):
    from assistant import model as base_models
    from assistant.chat import ChatService, TransformersBackend

    snapshot = write_snapshot(16, 4)
    result = main(tiny_cfg(tiny_model_dir, max_steps=4))
    payload = result.as_json()
    for key in ("adapter", "path", "train_loss", "val_loss", "stopped_early", "seconds", "tokens_per_s"):
        assert key in payload
    assert result.method == "qlora" and result.dataset == "d0001" and result.steps == 4 and result.tokens_per_s > 0
    folder = Path(result.path)
    assert folder == adapters.adapter_path(result.adapter) and folder.is_dir()
    assert {p.name for p in folder.iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json", "provenance.json", "train_config.json",
        "dataset_manifest.json", "loss_history.json", "loss_curve.png",
    }
    assert not [p for p in paths.adapters_dir().iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "dataset_manifest.json").read_bytes() == (snapshot / "manifest.json").read_bytes()

    info = base_models.prepare(str(tiny_model_dir))
    provenance = adapters.validate(folder, info.model_id, info.sha256)
    assert provenance["base_model"] == str(tiny_model_dir) and provenance["base_model_sha256"] == info.sha256
    assert provenance["method"] == "qlora" and provenance["seed"] == 1234
    assert provenance["weights_sha256"] == paths.sha256_file(folder / "adapter_model.safetensors")
    assert provenance["dataset"]["version"] == "d0001"
    assert provenance["dataset"]["manifest_sha256"] == paths.sha256_file(snapshot / "manifest.json")
    assert provenance["system_prompt"] == SYSTEM and "<|im_start|>" in provenance["chat_template"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(provenance["libraries"])
    assert provenance["train_config"] == json.loads((folder / "train_config.json").read_text())
    assert provenance["train_config"]["lr"] == DEFAULT_LR["qlora"]
    # The device's batching decisions are recorded as made, not as "auto".
    assert provenance["train_config"]["share_prefix"] == "on" and provenance["train_config"]["group_by_length"] == "on"
    history = json.loads((folder / "loss_history.json").read_text())
    assert [e["step"] for e in history["train"]] == [1, 2, 3, 4] and history["val"][0]["step"] == 0
    with pytest.raises(adapters.AdapterError, match="built for base model"):
        adapters.validate(folder, "another/model", "0" * 64)

    adapters.set_current(result.adapter, "test")
    backend = TransformersBackend(ServeConfig(base_model=str(tiny_model_dir), device="cpu", max_new_tokens=4))
    assert backend.active == result.adapter and backend.last_error is None
    stream = ChatService(ServeConfig(base_model=str(tiny_model_dir), max_new_tokens=4), backend).answer("Where is my card?")
    list(stream)
    assert stream.stats.adapter == result.adapter and stream.stats.tokens_out > 0


def test_full_fine_tuning_writes_model_weights_the_server_does_not_swap_in(tiny_model_dir):
    write_snapshot(8, 2)
    result = main(tiny_cfg(tiny_model_dir, method="full", max_steps=2))
    folder = Path(result.path)
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "adapter_model.safetensors" not in names
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["method"] == "full" and provenance["servable"] is False
    with pytest.raises(adapters.AdapterError):
        adapters.set_current(result.adapter, "test")


def test_same_data_and_seed_give_the_same_adapter(tiny_model_dir):
    from safetensors.torch import load_file

    write_snapshot(12, 4)
    first = main(tiny_cfg(tiny_model_dir, max_steps=3))
    second = main(tiny_cfg(tiny_model_dir, max_steps=3))
    third = main(tiny_cfg(tiny_model_dir, max_steps=3, seed=7))
    a, b, c = (load_file(str(Path(r.path) / "adapter_model.safetensors")) for r in (first, second, third))
    assert first.adapter != second.adapter and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- refusals and the bitsandbytes trap --------------------------------------------------------------


def test_refuses_missing_or_too_small_datasets(tiny_model_dir, tmp_path, capsys):
    from tuneloop import cli

    with pytest.raises(data.DatasetError, match="no dataset snapshot"):
        main(tiny_cfg(tiny_model_dir))
    with pytest.raises(data.DatasetError, match="does not exist"):
        main(tiny_cfg(tiny_model_dir, dataset=str(tmp_path / "nowhere")))
    (tmp_path / "no-manifest").mkdir()
    with pytest.raises(data.DatasetError, match="manifest.json is missing"):
        main(tiny_cfg(tiny_model_dir, dataset=str(tmp_path / "no-manifest")))
    write_snapshot(3, 2)
    with pytest.raises(data.DatasetError, match="has 3 training examples.*at least 8"):
        main(tiny_cfg(tiny_model_dir))
    write_snapshot(10, 0, name="d0002")
    with pytest.raises(data.DatasetError, match="no validation examples"):
        main(tiny_cfg(tiny_model_dir))
    write_snapshot(10, 2, name="d0003")
    with pytest.raises(data.DatasetError, match="after skipping examples longer than max_length=16"):
        main(tiny_cfg(tiny_model_dir, max_length=16))
    assert adapters.list_versions() == []
    assert cli.main(["train", "--base-model", str(tiny_model_dir), "--dataset", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bnb_wrong_gradient_warning_is_an_error():
    message = "bitsandbytes::gemv_4bit: an autograd kernel was not registered to the Autograd key(s)"
    with pytest.raises(TrainError, match="gradients would be wrong"):
        with bnb_trap_guard():
            warnings.warn(message, UserWarning)
    with pytest.raises(TrainError, match="gradients would be wrong"):
        with bnb_trap_guard():
            logging.getLogger("bitsandbytes").warning(message)
    with bnb_trap_guard():
        warnings.warn("an unrelated warning", UserWarning)


def allow_repack(model) -> None:
    """Undo assistant.model.keep_4bit_layout: bitsandbytes' default on AVX512-BF16 CPUs."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True


def test_refuses_a_4bit_base_that_already_ran_inference(tiny_model_dir):
    from bitsandbytes.functional import has_avx512bf16

    from assistant import model as base_models

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    tokenizer, model = base_models.load_base(base_models.prepare(str(tiny_model_dir)), "nf4", "cpu")
    with torch.no_grad():
        model(**tokenizer("hello", return_tensors="pt"))
    disable_cpu_inference_repack(model)  # load_base keeps the trainable layout through inference
    allow_repack(model)  # a 4-bit model loaded elsewhere, with bitsandbytes' default
    with torch.no_grad():
        model(**tokenizer("hello", return_tensors="pt"))
    with pytest.raises(TrainError, match="freshly loaded base"):
        disable_cpu_inference_repack(model)


def test_the_real_wrong_gradient_warning_is_caught(tiny_model_dir):
    from bitsandbytes.functional import has_avx512bf16
    from peft import LoraConfig, get_peft_model

    from assistant import model as base_models

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    tokenizer, model = base_models.load_base(base_models.prepare(str(tiny_model_dir)), "nf4", "cpu")
    allow_repack(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    inputs = tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        model(**inputs)  # an inference pass: the 4-bit weights are repacked
    model.train()
    with pytest.raises(TrainError, match="gradients would be wrong"):
        with bnb_trap_guard():
            model(**inputs, labels=inputs["input_ids"]).loss.backward()


# --- entry points ------------------------------------------------------------------------------------


def test_cli_train_prints_the_result_as_json(tiny_model_dir, capsys):
    from tuneloop import cli

    write_snapshot(8, 2)
    code = cli.main([
        "train", "--base-model", str(tiny_model_dir), "--method", "lora", "--max-steps", "2", "--lr", "0.01",
        "--min-train-examples", "8", "--no-progress", "--json",
    ])
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["method"] == "lora" and payload["steps"] == 2 and payload["adapter"] in adapters.list_versions()
    train_config = json.loads((Path(payload["path"]) / "train_config.json").read_text())
    assert train_config["lr"] == 0.01 and train_config["max_steps"] == 2


def test_cli_train_help_lists_the_options():
    from tuneloop import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])


def test_train_in_subprocess_returns_the_child_result(tiny_model_dir):
    write_snapshot(8, 2)
    result = train_in_subprocess(tiny_cfg(tiny_model_dir, method="lora", max_steps=2), timeout=600)
    assert result.adapter in adapters.list_versions() and result.steps == 2
    with pytest.raises(data.DatasetError, match="does not exist"):
        train_in_subprocess(tiny_cfg(tiny_model_dir, dataset="/nonexistent/d0009"), timeout=600)


# --- slow: distributed, and the real model -----------------------------------------------------------


@pytest.mark.slow
def test_data_parallel_training_with_two_cpu_processes(tiny_model_dir, tmp_path):
    write_snapshot(16, 4)
    config_file, result_file = tmp_path / "cfg.json", tmp_path / "result.json"
    config_file.write_text(json.dumps(tiny_cfg(tiny_model_dir, method="lora", max_steps=3).__dict__))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        "-m", "trainer.train", "--config-json", str(config_file), "--result-json", str(result_file),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["steps"] == 3 and adapters.list_versions() == [result["adapter"]]
    provenance = json.loads((Path(result["path"]) / "provenance.json").read_text())
    assert provenance["world_size"] == 2


@pytest.mark.slow
def test_qlora_on_the_real_model_is_served_in_nf4():
    from assistant.chat import ChatService, TransformersBackend

    snapshot = write_snapshot(16, 4)
    result = main(TrainConfig(dataset=str(snapshot), max_steps=5, device="cpu", progress=False))
    assert result.method == "qlora" and result.steps == 5 and result.val_loss < result.base_val_loss
    adapters.set_current(result.adapter, "test")
    cfg = ServeConfig(quantization="nf4", device="cpu", max_new_tokens=24)
    backend = TransformersBackend(cfg)
    assert backend.active == result.adapter and backend.last_error is None
    stream = ChatService(cfg, backend).answer("How do I sort out my card?")
    text = "".join(stream)
    assert text.strip() and stream.stats.adapter == result.adapter


@pytest.mark.gpu
def test_qlora_trains_on_cuda_with_bf16_compute(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    write_snapshot(8, 2)
    result = main(tiny_cfg(tiny_model_dir, device="cuda", max_steps=3))
    provenance = json.loads((Path(result.path) / "provenance.json").read_text())
    assert provenance["device"] == "cuda" and provenance["method"] == "qlora" and result.val_loss < 20
