"""The optimisation loop: :func:`fit` runs HF Trainer (with a shared-prefix batch, distilled replay
and NEFTune in :class:`LoopTrainer`), validates each epoch or every ``eval_steps``, measures the
forgetting curve, stops early, keeps the best weights and shows progress; it writes nothing.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass

from assistant import paths

paths.quiet_optional_kernels()  # before transformers' Trainer imports bitsandbytes

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from assistant import model as base_models  # noqa: E402
from trainer import data  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.model import TrainError, bnb_trap_guard, disable_cpu_inference_repack, for_device  # noqa: E402


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
    cfg = for_device(cfg)  # main() did this already; kept for callers that build their own cfg
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
            bf16=cfg.precision == "bf16",  # autocast; master weights and AdamW stay fp32
            train_sampling_strategy="group_by_length" if cfg.group_by_length == "on" else "random",
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,
        )
        # Under DDP a second forward before the backward would upset the gradient reducer.
        share_prefix = cfg.share_prefix == "on" and args.world_size == 1
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
    """Training progress on the main process's stderr: on a terminal one tqdm bar (steps, ETA,
    latest train and val loss); elsewhere a line after the first step and about every tenth of the
    steps with the step and the latest losses (the validation's with the step it was taken at),
    which a log keeps readable where a bar would be a long run of redraws."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False
        self.bar = None
        self.postfix: dict = {}
        self.val_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.shown = self.enabled and state.is_world_process_zero
        if self.shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.shown or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
        if "eval_loss" in logs:
            self.postfix["val"] = f"{logs['eval_loss']:.3f}"
            self.val_step = state.global_step
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
        elif "loss" in logs and _line_due(state.global_step, state.max_steps):
            step, total = state.global_step, state.max_steps
            # The latest validation may be many steps old (the next comes at the epoch's end): say when.
            when = "before training" if self.val_step == 0 else f"at step {self.val_step}"
            val = f", val loss {self.postfix['val']} {when}" if "val" in self.postfix else ""
            print(f"training: step {step}/{total} ({100 * step // total}%), loss {self.postfix['loss']}{val}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _line_due(step: int, total: int) -> bool:
    """Whether a log gets a line after ``step``: the first (training has started; a tenth can take an
    hour), and the end of each of about ten equal parts of ``total`` (every step when fewer than ten)."""
    every = max(1, math.ceil(total / 10))
    return step == 1 or step % every == 0 or step == total
