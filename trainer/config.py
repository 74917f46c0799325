"""The training job's config: ``[train]`` in ``config.toml``, ``TUNELOOP_TRAIN_<FIELD>``, ``--field value``.

Fields left empty (``base_model``, ``system_prompt``, ``method``), ``lr = 0`` and ``replay_loss = "auto"`` are resolved by
:func:`resolve` from the serve config and the measured defaults, so an adapter is always trained on
the base, persona and quantization it will be served with. The resolved config is what is written
beside the adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from assistant.config import ConfigError, ServeConfig, Switch, check, load

METHODS = ("qlora", "lora", "full")
# QLoRA measured on SmolLM2-135M-Instruct with 200 banking77 examples (see docs/results.md);
# lora shares it; full is the usual full fine-tuning rate, not swept here.
DEFAULT_LR = {"qlora": 3e-3, "lora": 3e-3, "full": 5e-5}
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainConfig:
    base_model: str = ""
    """Base model id or folder; empty = the serve config's base_model (an adapter only fits its own base)."""
    method: str = ""
    """"qlora" (4-bit nf4 base), "lora" (unquantized base) or "full" (all weights; measurement only); empty = qlora when serving nf4, else lora."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    precision: str = "auto"
    """Compute precision: "bf16" (autocast; fp32 master weights and optimizer), "fp32", or "auto" = bf16 where the device computes it natively (CUDA, or a CPU with AVX512-BF16 or AMX), else fp32."""
    system_prompt: str = ""
    """System message of every training example; empty = the serve config's system_prompt."""
    dataset: str = ""
    """Dataset snapshot folder (train/val/test.jsonl + manifest.json); empty = the latest under $TUNELOOP_HOME/datasets."""
    epochs: float = 5.0
    """Passes over the training split (fractions allowed); more epochs learn the domain better but forget more general text, which replay and the forgetting bar hold in check."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = run all epochs."""
    batch_size: int = 8
    """Examples per optimizer step and device (before gradient accumulation)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 0.0
    """Peak learning rate; 0 = the measured default for the method (qlora/lora 3e-3, full 5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warmup: "linear", "cosine" or "constant"."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str = ALL_PROJECTIONS
    """Comma-separated module names that get LoRA: all attention and MLP projections by default."""
    max_length: int = 512
    """Longest example in tokens (chat template included); longer examples are skipped and counted."""
    eval_steps: int = 0
    """Validate every this many steps; 0 = once per epoch."""
    patience: int = 2
    """Validations in a row without a lower val loss before training stops; 0 = never stop early."""
    general_text: str = ""
    """File of general (non-domain) text, one passage per line, whose perplexity is measured at every validation (the forgetting curve); empty = not measured. The nightly job passes the gate's file."""
    general_skip: int = 0
    """Passages at the start of general_text left out here (the nightly job leaves the gate's own passages to the gate)."""
    max_perplexity_ratio: float = 0.0
    """Keep only weights whose general-text perplexity is at most this times the untrained model's (the lowest validation loss if none is); 0 = no limit. It decides what is kept, not when to stop. The nightly job passes the gate's bar."""
    min_train_examples: int = 16
    """Refuse to train on fewer training examples than this."""
    share_prefix: Switch = "auto"
    """"on": compute the tokens all examples of a batch start with (the system prompt) once per batch instead of once per example (same loss, fewer tokens); "off"; "auto" = on for CPU training, where it pays, off on CUDA, where its extra forward costs more than it saves."""
    replay: float = 0.1
    """Rows of text sampled from the base model itself, per training example, mixed into training (self-distillation replay against forgetting, see trainer/replay.py and replay_loss); 0 = none."""
    replay_loss: str = "auto"
    """How replay rows are learnt: "kl" (the base's whole next-token distribution on the row, read from the training model with its adapter switched off: a target that cannot be learnt by heart), "tokens" (the sampled tokens as labels), or "auto" = kl for LoRA/QLoRA, tokens for full fine-tuning (which has no adapter to switch off)."""
    augment: float = 0.0
    """Noisy copies of each training question (a keyboard slip and/or texting style, same answer) added to the training split, e.g. 1.0 = one copy per example; 0 = none; validation and test are never copied. Off: it did not raise label F1 (docs/results.md)."""
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al. 2023): noise of magnitude alpha / sqrt(tokens x width) on the input embeddings of domain batches (never replay rows), against learning the questions' exact wording; 0 = off, 5 is the paper's usual value. Off: it did not raise label F1 (docs/results.md)."""
    hints: int = 0
    """Topic hints: the k labels a question classifier (fitted on the labelled training questions, saved in the adapter) finds likeliest, in each prompt's system message in training, evaluation and service (assistant/hints.py); 0 = none. Off: it did not raise label F1 (docs/results.md)."""
    retrieval_k: int = 0
    """References per prompt: the k training pairs nearest each question (never itself or its paraphrase cluster) in its system message, as serving puts approved pairs there; recorded in the adapter, which is served with the same settings; 0 = none (served without references)."""
    retrieval_min_score: float = 0.4
    """Least cosine similarity of a reference's question to the prompt's question, in training and in service."""
    retrieval_distractors: float = 0.2
    """Share of training prompts whose references are k random unrelated pairs instead, so the model learns to ignore wrong ones (RAFT)."""
    retrieval_missing: float = 0.1
    """Share of training prompts with no references, so the model also answers without them."""
    group_by_length: Switch = "auto"
    """"on": batch examples of similar length together (less padding); "off": random batches; "auto" = on for CPU training, off on CUDA, where padding costs little and length-sorted batches trained slower."""
    seed: int = 1234
    """Seed for adapter init, shuffling and dropout: same data and seed give the same adapter on CPU."""
    progress: bool = True
    """Show a progress bar with ETA on stderr."""

    def __post_init__(self) -> None:
        check(self.method in ("",) + METHODS, f"method must be one of {', '.join(METHODS)} (or empty), not {self.method!r}")
        for name in DEVICE_DEFAULTS:  # a config file's true/false, or on/off/yes/no/1/0 from a command line
            setattr(self, name, _on_off(getattr(self, name), name))
        check(self.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        check(self.precision in ("auto", "bf16", "fp32"), f"precision must be 'auto', 'bf16' or 'fp32', not {self.precision!r}")
        check(0 < self.epochs <= 100, "epochs must be in (0, 100]")
        check(self.max_steps >= 0, "max_steps must be 0 (no limit) or positive")
        check(1 <= self.batch_size <= 1024, "batch_size must be between 1 and 1024")
        check(1 <= self.grad_accum <= 1024, "grad_accum must be between 1 and 1024")
        check(0.0 <= self.lr <= 1.0, "lr must be between 0 (method default) and 1")
        check(0.0 <= self.weight_decay <= 1.0, "weight_decay must be between 0 and 1")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")
        check(self.lr_scheduler in ("linear", "cosine", "constant"), "lr_scheduler must be 'linear', 'cosine' or 'constant'")
        check(1 <= self.lora_r <= 1024, "lora_r must be between 1 and 1024")
        check(1 <= self.lora_alpha <= 4096, "lora_alpha must be between 1 and 4096")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
        check(bool(self.target_list()), "target_modules must name at least one module, e.g. q_proj,v_proj")
        check(16 <= self.max_length <= 32768, "max_length must be between 16 and 32768")
        check(self.eval_steps >= 0, "eval_steps must be 0 (every epoch) or positive")
        check(self.patience >= 0, "patience must be 0 (never stop early) or positive")
        check(0.0 <= self.replay <= 10.0, "replay must be between 0 (none) and 10 replay rows per training example")
        check(self.replay_loss in ("auto", "kl", "tokens"), f"replay_loss must be 'auto', 'kl' or 'tokens', not {self.replay_loss!r}")
        check(0.0 <= self.augment <= 10.0, "augment must be between 0 (none) and 10 noisy copies per training example")
        check(0 <= self.hints <= 20, "hints must be between 0 (none) and 20 labels per prompt")
        check(0 <= self.retrieval_k <= 20, "retrieval_k must be between 0 (no references) and 20")
        check(0.0 <= self.retrieval_min_score <= 1.0, "retrieval_min_score must be between 0 and 1")
        check(0.0 <= self.retrieval_distractors and 0.0 <= self.retrieval_missing
              and self.retrieval_distractors + self.retrieval_missing <= 1.0,
              "retrieval_distractors and retrieval_missing are shares of prompts: each >= 0, together at most 1")
        check(0.0 <= self.neftune_alpha <= 100.0, "neftune_alpha must be between 0 (off) and 100")
        check(self.general_skip >= 0, "general_skip must be 0 or positive")
        check(self.max_perplexity_ratio == 0 or self.max_perplexity_ratio >= 1.0,
              "max_perplexity_ratio must be 0 (no limit) or at least 1.0 (1.25 allows a 25% rise)")
        check(not self.max_perplexity_ratio or self.general_text, "max_perplexity_ratio needs general_text to measure perplexity on")
        check(self.min_train_examples >= 1, "min_train_examples must be at least 1")
        check(0 <= self.seed < 2**32, "seed must be between 0 and 2**32 - 1")

    def target_list(self) -> list[str]:
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


DEVICE_DEFAULTS = ("share_prefix", "group_by_length")
"""Fields whose "auto" is decided by the device that trains (:func:`trainer.model.for_device`)."""


def _on_off(value, name: str) -> str:
    text = str(value).strip().lower()
    aliases = {"true": "on", "1": "on", "yes": "on", "on": "on", "false": "off", "0": "off", "no": "off", "off": "off",
               "auto": "auto"}
    check(text in aliases, f"{name} must be 'auto', 'on' or 'off', not {value!r}")
    return aliases[text]


def resolve(cfg: TrainConfig, serve: ServeConfig | None = None) -> TrainConfig:
    """Fill the empty fields from the serve config and ``lr = 0`` from the measured defaults.

    Idempotent: a config with nothing left to fill comes back as it is, without reading the serve
    config again, so the training process keeps exactly what :func:`resolve_configs` resolved in
    the process that started it (whatever the config file says by then).
    """
    if not resolved(cfg):
        serve = serve or load(ServeConfig, "serve")
        method = cfg.method or ("qlora" if serve.quantization == "nf4" else "lora")
        cfg = dataclasses.replace(
            cfg,
            base_model=cfg.base_model or serve.base_model,
            system_prompt=cfg.system_prompt or serve.system_prompt,
            method=method,
            lr=cfg.lr or DEFAULT_LR[method],
            replay_loss=("tokens" if method == "full" else "kl") if cfg.replay_loss == "auto" else cfg.replay_loss,
        )
    check(not (cfg.method == "full" and cfg.replay_loss == "kl"),
          "replay_loss 'kl' reads the base from the adapter switched off, and full fine-tuning has no adapter; "
          "use replay_loss = 'tokens' (or 'auto') with method 'full'")
    return cfg


def resolved(cfg: TrainConfig) -> bool:
    """Whether every field :func:`resolve` fills is already set."""
    return bool(cfg.base_model and cfg.system_prompt and cfg.method and cfg.lr) and cfg.replay_loss != "auto"


def resolve_configs(train: TrainConfig | None = None, serve: ServeConfig | None = None) -> tuple[TrainConfig, ServeConfig]:
    """The train and serve configs of one job, resolved together: the one place this happens.

    A section not given is loaded by :func:`assistant.config.load`: defaults < config file (where
    ``tuneloop init`` installs the pack's persona and title) < environment; a given one was built
    the same way with the command line's ``--field value`` on top (:func:`assistant.config.from_args`).
    Then the train config's empty fields are filled from that very serve config (:func:`resolve`), so
    training, evaluation and serving read one set of values: the same base model, system prompt and
    quantization, and the generation settings the evaluation uses are the served ones.
    """
    serve = serve or load(ServeConfig, "serve")
    return resolve(train or load(TrainConfig, "train"), serve), serve


__all__ = ["TrainConfig", "ConfigError", "resolve", "resolve_configs", "resolved", "METHODS", "DEFAULT_LR"]
