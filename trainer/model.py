"""The model a training run trains: a freshly loaded base prepared for the method (LoRA-wrapped,
or fully trainable), the precision it trains in, and the guards that keep bitsandbytes' 4-bit
layers from silently dropping gradients (see "bitsandbytes and fresh processes" in
:mod:`trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import torch

from assistant import model as base_models
from trainer.config import DEVICE_DEFAULTS, TrainConfig

# The message PyTorch gives when bitsandbytes' inference-only 4-bit kernel ends up in a backward pass.
BNB_TRAP = "autograd kernel was not registered"


class TrainError(RuntimeError):
    """Training cannot run, or would produce a wrong adapter; the message says why."""


def effective_precision(cfg: TrainConfig) -> str:
    """``cfg.precision`` with "auto" decided for the device this run trains on."""
    if cfg.precision != "auto":
        return cfg.precision
    device = base_models.resolve_device(cfg.device)
    native = torch.cuda.is_bf16_supported() if device == "cuda" else base_models.cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def for_device(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every device-dependent "auto" decided for the device this run trains on: the
    precision, and the CPU-made batching tricks (``share_prefix``, ``group_by_length``), which pay on
    a CPU and cost on CUDA (docs/results.md, "Training on a GPU"). Idempotent; the result is what
    the adapter's provenance records."""
    on_cpu = base_models.resolve_device(cfg.device) == "cpu"
    fill = {name: ("on" if on_cpu else "off") for name in DEVICE_DEFAULTS if getattr(cfg, name) == "auto"}
    return dataclasses.replace(cfg, precision=effective_precision(cfg), **fill)


def load_for_training(info: base_models.BaseModelInfo, cfg: TrainConfig):
    """A freshly loaded base, prepared for ``cfg.method``: LoRA-wrapped, or fully trainable."""

    tokenizer, model = base_models.load_base(info, "nf4" if cfg.method == "qlora" else "none", cfg.device,
                                             bf16_compute=effective_precision(cfg) == "bf16")
    return tokenizer, prepare_for_training(model, cfg, info.model_id)


def prepare_for_training(model, cfg: TrainConfig, model_id: str):
    """A loaded base made ready for ``cfg.method``: LoRA-wrapped (recording ``model_id`` as its
    base) or fully trainable. :func:`load_for_training` calls it; ``benchmarks/gpu.py`` calls it on
    random weights of a model's shape."""
    from transformers import set_seed

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        disable_cpu_inference_repack(model)
        # Gradient checkpointing would trade time for memory a 135M model does not need.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif cfg.method == "full" or effective_precision(cfg) != "bf16":
        # Trained weights in fp32 (pure-bf16 AdamW loses small updates), as is a computation asked in fp32.
        model = model.float()
    # LoRA under bf16 autocast keeps its frozen base as loaded (bf16 on CUDA: half the memory, and
    # no cast of every base weight at every step); PEFT makes the adapter's own weights fp32.
    model.config.use_cache = False
    set_seed(cfg.seed)  # the LoRA A matrices are drawn now; same seed, same start
    if cfg.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
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
    model.peft_config["default"].base_model_name_or_path = model_id
    return model


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
