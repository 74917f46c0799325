"""The training job: a fresh base model + LoRA (or QLoRA, or full fine-tuning) on a dataset snapshot,
written as a new adapter folder under ``$TUNELOOP_HOME/adapters/<version>/``.

Reads top to bottom in :func:`main`: open the snapshot, load a fresh base, encode through the chat
template, fit with validation and early stopping, keep the best weights, export with provenance.
``python -m trainer.train --config-json FILE`` runs it in its own process (what
:func:`train_in_subprocess` and ``torchrun`` use).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from assistant import paths

paths.quiet_optional_kernels()  # before transformers' Trainer imports bitsandbytes

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from assistant import adapters  # noqa: E402
from assistant import model as base_models
from assistant.config import ConfigError
from assistant.hints import TopicHints
from trainer import augment, data, replay
from trainer.config import TrainConfig, resolve

log = logging.getLogger(__name__)

# The message PyTorch gives when bitsandbytes' inference-only 4-bit kernel ends up in a backward pass.
BNB_TRAP = "autograd kernel was not registered"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "datasets")


class TrainError(RuntimeError):
    """Training cannot run, or would produce a wrong adapter; the message says why."""


@dataclass
class TrainResult:
    """What a training run produced (``tuneloop train --json`` prints it)."""

    adapter: str | None
    """The new adapter version (None on non-zero ranks of a distributed run)."""
    path: str | None
    """The adapter folder."""
    method: str
    """qlora, lora or full."""
    train_loss: float
    """Mean training loss over the last 10 optimizer steps."""
    val_loss: float
    """Validation loss of the kept (best) weights."""
    base_val_loss: float
    """Validation loss of the base model before training, for comparison."""
    stopped_early: bool
    """True when validation loss stopped improving before the planned last step."""
    best_step: int
    """Optimizer step of the kept weights."""
    steps: int
    """Optimizer steps run."""
    seconds: float
    """Wall time of the whole job (loading, training, validation, export)."""
    tokens_per_s: float
    """Real (non-padding) training tokens per second of training-step time, all processes together."""
    train_examples: int
    """Training examples used."""
    replay_examples: int
    """Replay rows of base-model text mixed in (``replay``); not counted in train_examples."""
    augmented_examples: int
    """Noisy copies of training questions (``augment``) included in train_examples."""
    val_examples: int
    """Validation examples used."""
    skipped_too_long: int
    """Examples skipped for exceeding max_length."""
    perplexity_ratio: float | None
    """General-text perplexity of the kept weights / the untrained model's (None: general_text not set)."""
    within_perplexity_bar: bool | None
    """Whether the kept weights are within max_perplexity_ratio (None: no bar set)."""
    dataset: str
    """Dataset snapshot version."""

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def main(cfg: TrainConfig) -> TrainResult:
    """Train one adapter on a freshly loaded base and write it under ``adapters/<version>/``."""
    started = time.perf_counter()
    paths.configure_environment()
    cfg = resolve(cfg)
    cfg = dataclasses.replace(cfg, precision=effective_precision(cfg))  # written beside the adapter as used
    snapshot = data.open_snapshot(cfg.dataset)
    train_rows = data.load_split(snapshot.path, "train")
    val_rows = data.load_split(snapshot.path, "val")
    _check_sizes(cfg, snapshot, len(train_rows), len(val_rows))
    general = data.read_general_text(cfg.general_text, cfg.general_skip) if cfg.general_text else None
    # Validation and test questions are never roughened: only the training split gets noisy copies.
    noisy_rows = augment.augment_rows(train_rows, cfg.augment, cfg.seed)
    train_rows = train_rows + noisy_rows

    hints, train_hints, val_hints = None, None, None
    labels = data.labels_of(train_rows)
    if cfg.hints and len(labels) < 2:
        # Hints name labels: a dataset without them (answer-F1-only feedback) trains without.
        log.warning("topic hints are off for this adapter: the training split has %d label(s), hints need two or more",
                    len(labels))
    elif cfg.hints:
        # Before the base loads: the question classifier's embeddings are torch work of their own.
        hints, train_hints, val_hints = data.topic_hints(train_rows, val_rows, cfg.hints, cfg.seed)

    info = base_models.prepare(cfg.base_model)
    # Sampled (or read from the cache) before the training model loads, by a copy freed afterwards.
    replay_texts = replay.base_samples(info, round(cfg.replay * len(train_rows)), cfg.device, cfg.seed)
    tokenizer, model = load_for_training(info, cfg)
    train_set, skipped_train = data.encode_rows(tokenizer, cfg.system_prompt, train_rows, cfg.max_length, train_hints)
    replay_set = replay.encode_texts(tokenizer, replay_texts, cfg.max_length, distil=cfg.replay_loss == "kl")
    val_set, skipped_val = data.encode_rows(tokenizer, cfg.system_prompt, val_rows, cfg.max_length, val_hints)
    _check_sizes(cfg, snapshot, len(train_set), len(val_set), after_max_length=True)

    # Validation stays domain-only: early stopping and the kept weights follow the domain loss.
    outcome = fit(cfg, tokenizer, model, train_set + replay_set, val_set, general=general)
    result = TrainResult(
        adapter=None,
        path=None,
        method=cfg.method,
        train_loss=outcome.train_loss,
        val_loss=outcome.best_val_loss,
        base_val_loss=outcome.base_val_loss,
        stopped_early=outcome.stopped_early,
        best_step=outcome.best_step,
        steps=outcome.steps,
        seconds=round(time.perf_counter() - started, 2),  # export adds well under a second
        tokens_per_s=outcome.tokens_per_s,
        train_examples=len(train_set),
        replay_examples=len(replay_set),
        augmented_examples=len(noisy_rows),
        val_examples=len(val_set),
        skipped_too_long=skipped_train + skipped_val,
        perplexity_ratio=outcome.perplexity_ratio,
        within_perplexity_bar=outcome.within_perplexity_bar,
        dataset=snapshot.version,
    )
    if outcome.is_main_process:
        folder = export(cfg, info, snapshot, tokenizer, model, outcome, result, hints)
        result.adapter, result.path = folder.name, str(folder)
    return result


def _check_sizes(cfg: TrainConfig, snapshot: data.Snapshot, n_train: int, n_val: int, after_max_length: bool = False) -> None:
    why = f" after skipping examples longer than max_length={cfg.max_length}" if after_max_length else ""
    if n_train < cfg.min_train_examples:
        raise data.DatasetError(
            f"dataset {snapshot.version} has {n_train} training examples{why}; at least {cfg.min_train_examples} "
            "are needed (collect more corrections, or lower min_train_examples)"
        )
    if n_val < 1:
        raise data.DatasetError(
            f"dataset {snapshot.version} has no validation examples{why}; validation loss picks the kept weights"
        )


def effective_precision(cfg: TrainConfig) -> str:
    """``cfg.precision`` with "auto" decided for the device this run trains on."""
    if cfg.precision != "auto":
        return cfg.precision
    device = base_models.resolve_device(cfg.device)
    native = torch.cuda.is_bf16_supported() if device == "cuda" else base_models.cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def load_for_training(info: base_models.BaseModelInfo, cfg: TrainConfig):
    """A freshly loaded base, prepared for ``cfg.method``: LoRA-wrapped, or fully trainable."""
    from transformers import set_seed

    tokenizer, model = base_models.load_base(info, "nf4" if cfg.method == "qlora" else "none", cfg.device,
                                             bf16_compute=effective_precision(cfg) == "bf16")
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        disable_cpu_inference_repack(model)
        # Gradient checkpointing would trade time for memory a 135M model does not need.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif model.device.type == "cuda":
        # fp32 master weights, bf16 autocast (TrainingArguments.bf16): pure-bf16 AdamW loses small updates.
        model = model.float()
    model.config.use_cache = False
    set_seed(cfg.seed)  # the LoRA A matrices are drawn now; same seed, same start
    if cfg.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return tokenizer, model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_list(),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    # adapters.validate and the server compare against the configured id, not a cache path.
    model.peft_config["default"].base_model_name_or_path = info.model_id
    return tokenizer, model


def disable_cpu_inference_repack(model) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout whose kernel has a backward pass.

    On CPUs with AVX512-BF16, a ``Linear4bit`` repacks its weights for a faster inference-only
    kernel the first time it runs in eval mode without gradients -- which every validation pass
    does. Later backward passes through the repacked kernel silently drop gradients (PyTorch warns
    "gemv_4bit: an autograd kernel was not registered"). A base that already ran inference is
    refused: train on a freshly loaded one, in its own process.
    """
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise TrainError(
                "this 4-bit base model already ran inference and bitsandbytes repacked its weights for an "
                "inference-only kernel; train on a freshly loaded base (tuneloop train, or train_in_subprocess)"
            )
    base_models.keep_4bit_layout(model)  # load_base did this already; kept here for callers' own models


class _RaiseOnTrap(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if BNB_TRAP in record.getMessage():
            raise TrainError(f"bitsandbytes inference kernel in a backward pass, gradients would be wrong: {record.getMessage()}")


@contextlib.contextmanager
def bnb_trap_guard():
    """Turn the bitsandbytes wrong-gradient warning (a Python warning or a log record) into :class:`TrainError`."""
    handler = _RaiseOnTrap(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=f".*{BNB_TRAP}.*")
            try:
                yield
            except UserWarning as exc:
                if BNB_TRAP in str(exc):
                    raise TrainError(f"bitsandbytes inference kernel in a backward pass, gradients would be wrong: {exc}") from exc
                raise
    finally:
        root.removeHandler(handler)


@dataclass
class FitOutcome:
    """What :func:`fit` measured; the model holds the kept (best) weights afterwards."""

    train_loss: float
    best_val_loss: float
    base_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    tokens_per_s: float
    train_seconds: float
    history: dict
    perplexity_ratio: float | None
    within_perplexity_bar: bool | None
    is_main_process: bool
    world_size: int


class LoopTrainer(Trainer):
    """HF Trainer with two changes to how a batch is run (overriding ``compute_loss`` is HF
    Trainer's documented way to do that; everything else is the stock Trainer):

    - Shared prefix: the tokens every row of the batch starts with (``prefix_ids`` from
      :class:`data.PadCollator`) run once, and the rest of every row on their key/value cache. The
      result is the same causal attention, positions and loss as the whole padded batch (the prefix
      holds no answer tokens), and gradients flow through the cache into the LoRA weights of the
      prefix's layers; only the prefix's compute is done once instead of once per row.
    - Distilled replay: rows marked ``distil`` (base-model text, :mod:`trainer.replay`) are scored
      by the KL divergence from the base model's next-token distribution to the trained model's,
      the base being the same model with its adapter switched off (no copy, and for QLoRA exactly
      the 4-bit base that is served). The other rows keep their cross-entropy; every token counts
      once in the mean, as in the stock loss.
    - NEFTune (``neftune_alpha``): while training on a batch without replay rows, uniform noise of
      magnitude alpha / sqrt(L * d) is added to the input embeddings, L being the batch's whole row
      length (the shared prefix included, so splitting it off does not change the noise) and d the
      embedding width, as in Jain et al. 2023. Stock Trainer's ``neftune_noise_alpha`` would scale
      the prefix and the rest by their own lengths and would also perturb replay rows and the
      base's forward that gives them their target.
    """

    def __init__(self, *args, neftune_alpha: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.neftune_alpha = neftune_alpha
        self._noise_length = 0  # row length of the batch being trained on; 0 = no noise now
        if neftune_alpha:
            self.model.get_input_embeddings().register_forward_hook(self._noisy_embeddings)

    def _noisy_embeddings(self, module, inputs, output):
        if not (module.training and self._noise_length):
            return None  # the output unchanged
        magnitude = self.neftune_alpha / math.sqrt(self._noise_length * output.shape[-1])
        return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prefix = inputs.pop("prefix_ids", None)
        distil = inputs.pop("distil", None)
        if distil is not None and bool(distil.any()):
            if prefix is not None:  # the collator never shares a prefix with replay rows (their loss starts at token 1)
                raise TrainError("a batch with distilled replay rows cannot share a prefix")
            return self._distil_loss(model, inputs, distil.bool(), return_outputs, num_items_in_batch)
        self._noise_length = inputs["attention_mask"].shape[1]  # the full width, prefix included
        try:
            if prefix is not None:
                name = _cache_argument(model)
                cache = getattr(model(input_ids=prefix, use_cache=True), name)
                cache.batch_repeat_interleave(inputs["input_ids"].shape[0])
                inputs = {**inputs, name: cache}
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._noise_length = 0

    def _distil_loss(self, model, inputs, distil, return_outputs, num_items_in_batch):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        targets = inputs["labels"][:, 1:]
        counted = targets != data.IGNORE
        log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
        per_token = -log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        peft_model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), peft_model.disable_adapter():
            base_logits = peft_model(input_ids=inputs["input_ids"][distil], attention_mask=inputs["attention_mask"][distil]).logits
        base_log_probs = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
        kl = (base_log_probs.exp() * (base_log_probs - log_probs[distil])).sum(-1)
        per_token = per_token.masked_scatter(distil[:, None].expand_as(per_token), kl)
        total = (per_token * counted).sum()
        # Normalised as the model's own loss is, so Trainer's gradient-accumulation and multi-device
        # scaling (below, and in training_step) treat it the same.
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / counted.sum().clamp_min(1)
        return (loss, outputs) if return_outputs else loss


def _cache_argument(model) -> str:
    """The key/value cache's argument (and output) name: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class KeepBest(TrainerCallback):
    """Early stopping on validation loss, remembering the weights of the best validation.

    The validation before the first step (step 0) is the untrained baseline: recorded, never kept.
    Training stops after ``patience`` validations in a row without a new lowest validation loss.
    With ``max_ratio`` (and general-text perplexity in the metrics, from :class:`Forgetting`), only
    weights within ``max_ratio`` times the baseline's perplexity are kept; if no validation is
    within it, the lowest validation loss is kept. The bar decides what is kept, not when to stop:
    general-text perplexity is high while the learning rate is and falls again as it decays (on
    the pack, 1.31x the base's after epoch 1 of 6, 1.06x at the end of a 2-epoch run), so a
    stop on crossing it would end long runs just before they come back within it.
    """

    def __init__(self, patience: int, max_ratio: float = 0.0):
        self.patience = patience
        self.max_ratio = max_ratio
        self.best_loss = math.inf
        self.best_step = 0
        self.best_state: dict | None = None
        self.best_ratio: float | None = None
        self.within_bar: bool | None = None
        self.lowest_loss = math.inf
        self.since_lowest = 0
        self.stop_requested = False
        self.last_eval_step: int | None = None
        self.base_loss = math.nan
        self.base_perplexity: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = float(metrics["eval_loss"])
        perplexity = metrics.get(Forgetting.METRIC)
        self.last_eval_step = state.global_step
        if state.global_step == 0:
            self.base_loss, self.base_perplexity = loss, perplexity
            return
        ratio = perplexity / self.base_perplexity if perplexity and self.base_perplexity else None
        within = None if not self.max_ratio or ratio is None else ratio <= self.max_ratio
        # Within the bar beats over it; among equals, the lower loss wins.
        if (within is not False and self.within_bar is False) or (within == self.within_bar and loss < self.best_loss) \
                or self.best_state is None:
            self.best_loss, self.best_step, self.best_ratio, self.within_bar = loss, state.global_step, ratio, within
            self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if loss < self.lowest_loss:
            self.lowest_loss, self.since_lowest = loss, 0
        else:
            self.since_lowest += 1
            if self.patience and self.since_lowest >= self.patience:
                self.stop_requested = True
                control.should_training_stop = True

    def restore(self, model) -> None:
        if self.best_state is None:
            raise TrainError("no validation ran after a training step; nothing to keep")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.best_state:
                    parameter.copy_(self.best_state[name])


class Forgetting(TrainerCallback):
    """Perplexity on general text at every validation, into the metrics :class:`KeepBest` reads.

    The forgetting curve of the run; runs before KeepBest (callbacks are called in order).
    """

    METRIC = "eval_general_perplexity"

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.texts = texts
        self.curve: dict[int, float] = {}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        # The same bf16 autocast as the validation loss, so step 0 matches the untrained model's.
        device = next(model.parameters()).device.type
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
            value = base_models.perplexity(model, self.tokenizer, self.texts)
        metrics[self.METRIC] = self.curve[state.global_step] = round(value, 4)


class StepTimer(TrainerCallback):
    """Time spent in optimizer steps (validation and setup excluded)."""

    def __init__(self):
        self.seconds = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._start


class Progress(TrainerCallback):
    """One tqdm bar (steps, ETA, latest train and val loss) on the main process's stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.postfix: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
        if "eval_loss" in logs:
            self.postfix["val"] = f"{logs['eval_loss']:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fit(cfg: TrainConfig, tokenizer, model, train_set: list[dict], val_set: list[dict], collator=None,
        general: list[str] | None = None) -> FitOutcome:
    """Train ``model`` in place with HF Trainer; validate each epoch (or every ``eval_steps``), stop
    early when validation loss stops falling, and leave the best weights in the model.

    With ``general`` passages, every validation also measures perplexity on them, and
    ``cfg.max_perplexity_ratio`` bounds which weights may be kept (see :class:`KeepBest`).

    Runs data-parallel when started by ``torchrun``/``accelerate launch`` (HF Trainer's DDP).
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    disable_cpu_inference_repack(model)
    keeper, timer = KeepBest(cfg.patience, cfg.max_perplexity_ratio if general else 0.0), StepTimer()
    forgetting = [Forgetting(tokenizer, general)] if general else []
    on_cuda = next(model.parameters()).device.type == "cuda"
    schedule = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    with tempfile.TemporaryDirectory(prefix="tuneloop-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,  # nothing is saved there: save_strategy="no", export() writes the adapter
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            lr_scheduler_type=schedule,
            eval_strategy="steps" if cfg.eval_steps else "epoch",
            eval_steps=cfg.eval_steps or None,
            eval_on_start=True,
            prediction_loss_only=True,  # validation needs the loss only; gathering logits costs GBs
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=not on_cuda,
            bf16=effective_precision(cfg) == "bf16",  # autocast; master weights and AdamW stay fp32
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,
        )
        # Under DDP a second forward before the backward would upset the gradient reducer.
        share_prefix = cfg.share_prefix and args.world_size == 1
        trainer = LoopTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=collator or data.PadCollator(tokenizer.pad_token_id, share_prefix=share_prefix),
            callbacks=[*forgetting, keeper, timer, Progress(cfg.progress)],
            neftune_alpha=cfg.neftune_alpha,
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        with bnb_trap_guard():
            trainer.train()
            if keeper.last_eval_step != trainer.state.global_step:
                trainer.evaluate()  # the steps after the last validation may hold the best weights
        keeper.restore(model)
        state = trainer.state
        history = _history(state.log_history, keeper.best_step, forgetting[0].curve if forgetting else {})
        train_losses = [entry["loss"] for entry in history["train"]]
        return FitOutcome(
            train_loss=round(sum(train_losses[-10:]) / max(1, len(train_losses[-10:])), 4),
            best_val_loss=round(keeper.best_loss, 4),
            base_val_loss=round(keeper.base_loss, 4),
            best_step=keeper.best_step,
            steps=state.global_step,
            stopped_early=keeper.stop_requested and state.global_step < state.max_steps,
            tokens_per_s=round(state.num_input_tokens_seen / timer.seconds, 1) if timer.seconds else 0.0,
            train_seconds=round(timer.seconds, 2),
            history=history,
            perplexity_ratio=None if keeper.best_ratio is None else round(keeper.best_ratio, 4),
            within_perplexity_bar=keeper.within_bar,
            is_main_process=trainer.is_world_process_zero(),
            world_size=args.world_size,
        )


def _history(log_history: list[dict], best_step: int, general_perplexity: dict[int, float]) -> dict:
    train = [
        {"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["loss"], "lr": e.get("learning_rate")}
        for e in log_history
        if "loss" in e
    ]
    val = [{"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["eval_loss"]}
           | ({"general_perplexity": general_perplexity[e["step"]]} if e["step"] in general_perplexity else {})
           for e in log_history if "eval_loss" in e]
    return {"train": train, "val": val, "best_step": best_step}


def export(cfg: TrainConfig, info, snapshot: data.Snapshot, tokenizer, model, outcome: FitOutcome, result: TrainResult,
           hints: TopicHints | None = None) -> Path:
    """Write the adapter folder into a hidden staging folder and rename it into place at the end,
    so a killed run leaves no half adapter under ``adapters/``."""
    version = adapters.new_version()
    final = adapters.adapter_path(version)
    staging = final.with_name(f".{version}.partial")
    staging.mkdir(parents=True)
    try:
        # PEFT writes adapter_model.safetensors + adapter_config.json; full fine-tuning writes
        # model.safetensors + config.json, which the server refuses (it cannot hot-swap a whole model).
        if cfg.method == "full":
            model.save_pretrained(staging, safe_serialization=True)
        else:
            # The embeddings are frozen; "auto" would look the base id up on the hub to check that.
            model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        if hints is not None:
            hints.save(staging)  # served with this adapter, and only with it (assistant.hints)
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        weights = staging / (adapters.WEIGHTS_FILE if cfg.method != "full" else "model.safetensors")
        resolved = dataclasses.asdict(cfg)
        paths.write_json_atomic(staging / "train_config.json", resolved)
        shutil.copyfile(snapshot.path / "manifest.json", staging / "dataset_manifest.json")
        paths.write_json_atomic(staging / "loss_history.json", outcome.history)
        plot_losses(outcome.history, staging / "loss_curve.png", f"{version} ({cfg.method})")
        paths.write_json_atomic(
            staging / adapters.PROVENANCE_FILE,
            {
                "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base_model": info.model_id,
                "base_model_sha256": info.sha256,
                "weights_sha256": paths.sha256_file(weights),  # adapters.validate catches damage on disk
                "method": cfg.method,
                "servable": cfg.method != "full",
                "train_config": resolved,
                "seed": cfg.seed,
                "dataset": {
                    "version": snapshot.version,
                    "path": str(snapshot.path),
                    "manifest_sha256": snapshot.manifest_sha256,
                    "train_examples": result.train_examples,
                    "val_examples": result.val_examples,
                    "skipped_too_long": result.skipped_too_long,
                },
                "replay": {"examples": result.replay_examples,
                           "file": str(replay.cache_file(info, cfg.seed)) if result.replay_examples else None},
                "system_prompt": cfg.system_prompt,
                "topic_hints": {"k": hints.k, "labels": hints.classifier.classes} if hints else None,
                "chat_template": tokenizer.chat_template,
                "libraries": {name: _version(name) for name in LIBRARIES} | {"python": platform.python_version()},
                "device": "cuda" if next(model.parameters()).device.type == "cuda" else "cpu",
                "world_size": outcome.world_size,
                "result": result.as_json() | {"adapter": version, "path": str(final)},
            },
        )
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def plot_losses(history: dict, file: Path, title: str) -> None:
    """Train loss per step, validation loss per validation, the kept step marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)  # draws without pyplot, so no global backend state is touched
    axes = figure.add_subplot()
    axes.plot([e["step"] for e in history["train"]], [e["loss"] for e in history["train"]], label="train", linewidth=1)
    axes.plot([e["step"] for e in history["val"]], [e["loss"] for e in history["val"]], "o-", label="validation")
    if history["best_step"]:
        axes.axvline(history["best_step"], color="grey", linestyle="--", label=f"kept (step {history['best_step']})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(file, dpi=100)


def train_in_subprocess(cfg: TrainConfig, timeout: float | None = None) -> TrainResult:
    """Run :func:`main` in a child Python process (a fresh base, nothing shared with a server) and
    return its result; its progress bar and logs go to this process's stderr."""
    with tempfile.TemporaryDirectory(prefix="tuneloop-train-") as scratch:
        config_file, result_file = Path(scratch) / "config.json", Path(scratch) / "result.json"
        config_file.write_text(json.dumps(dataclasses.asdict(cfg)), encoding="utf-8")
        # -P: the working directory is not put on sys.path, so a trainer/ folder there cannot
        # replace ours; relative paths in the config still resolve against the caller's directory.
        command = [sys.executable, "-P", "-m", "trainer.train", "--config-json", str(config_file),
                   "--result-json", str(result_file)]
        try:
            completed = subprocess.run(command, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TrainError(f"training did not finish within {timeout} s and was stopped") from exc
        if not result_file.exists():
            raise TrainError(f"the training process exited with status {completed.returncode} without a result; see its output above")
        payload = json.loads(result_file.read_text(encoding="utf-8"))
    if "error" in payload:
        kind = data.DatasetError if payload.get("kind") == "DatasetError" else TrainError
        raise kind(payload["error"])
    return TrainResult(**payload)


def _command_line(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description="Train one adapter in this process (used by train_in_subprocess and torchrun).",
    )
    parser.add_argument("--config-json", required=True, help="a JSON object of TrainConfig fields")
    parser.add_argument("--result-json", help="write the result (or the error) here, from rank 0 only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = TrainConfig(**json.loads(Path(args.config_json).read_text(encoding="utf-8")))
        payload = main(cfg).as_json()
        status = 0
    except (ConfigError, data.DatasetError, TrainError, base_models.ModelError, adapters.AdapterError) as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        payload, status = {"error": str(exc), "kind": type(exc).__name__}, 2
    if args.result_json and rank0:
        paths.write_json_atomic(Path(args.result_json), payload)
    return status


if __name__ == "__main__":
    sys.exit(_command_line())
