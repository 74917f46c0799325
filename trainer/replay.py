"""Replay of the base model's own text during training, against forgetting.

An adapter trained only on the domain drifts on everything else: on the shipped pack, 6 epochs
took general-text perplexity to 5.5x the base model's, and the gate rejects such an adapter. Mixing
in text the base model itself wrote pulls the adapted model back towards the base on general text
(self-distillation replay). It needs no corpus, so it works for any base model, and it never sees
the gate's general text. Two losses (``TrainConfig.replay_loss``): ``"kl"`` (rows marked
``distil``) is the KL divergence from the base's whole next-token distribution at every position
to the adapted model's, the base being the training model with its adapter switched off
(:class:`trainer.loop.LoopTrainer`); ``"tokens"`` is the ordinary language-model loss on the
sampled tokens, a Monte Carlo estimate of the same KL that a long run learns by heart.

Samples are drawn once per base model (unconditional, from the token the tokenizer starts a text
with) and cached under ``$TUNELOOP_HOME/models/replay/``; a later run that needs more extends the
file, one seeded chunk at a time, so the first N samples never change. They are drawn from the
unquantized base in this process before the training model loads: a 4-bit model that ran
inference must not be trained, and this one is a separate copy that is freed before training.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from assistant import model as base_models
from assistant import paths

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 96
"""New tokens per sample: about a paragraph, shorter than a domain example so replay batches stay cheap."""
TOP_P = 0.95
"""Nucleus sampling: the base's distribution without its least likely tail (mostly broken tokens)."""
CHUNK = 32
"""Samples generated together; each chunk has its own seed, so the cache grows deterministically."""


def cache_file(info: base_models.BaseModelInfo, seed: int) -> Path:
    return paths.models_dir() / "replay" / f"{info.sha256[:16]}-t{SAMPLE_TOKENS}-p{TOP_P}-s{seed}.jsonl"


def base_samples(info: base_models.BaseModelInfo, n: int, device: str = "auto", seed: int = 0) -> list[str]:
    """``n`` texts sampled from the base model ``info`` (cached; drawn and appended when missing)."""
    if n <= 0:
        return []
    file = cache_file(info, seed)
    texts = _read(file)
    if len(texts) < n:
        texts += _generate(info, device, seed, first_chunk=len(texts) // CHUNK, chunks=-(-(n - len(texts)) // CHUNK))
        file.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(file, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts[:n]


def _read(file: Path) -> list[str]:
    if not file.exists():
        return []
    texts = [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    # A cache cut short by hand keeps whole chunks only, so the chunk seeds stay aligned.
    return texts[: len(texts) // CHUNK * CHUNK]


def _generate(info: base_models.BaseModelInfo, device: str, seed: int, first_chunk: int, chunks: int) -> list[str]:
    import torch

    started = time.perf_counter()
    tokenizer, model = base_models.load_base(info, "none", device)
    start = tokenizer("")["input_ids"] or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    texts: list[str] = []
    try:
        for chunk in range(first_chunk, first_chunk + chunks):
            torch.manual_seed(seed * 1_000_003 + chunk)
            ids = torch.tensor([start] * CHUNK, device=model.device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_p=TOP_P,
                    top_k=0,
                    max_new_tokens=SAMPLE_TOKENS,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for row in out[:, len(start) :]:
                texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        del model
        gc.collect()
    log.info("sampled %d replay texts from %s in %.1f s", len(texts), info.model_id, time.perf_counter() - started)
    return texts


def encode_texts(tokenizer, texts: list[str], max_length: int, distil: bool = False) -> list[dict]:
    """Training rows of plain text, tokenized as the forgetting check tokenizes it, loss on every token.

    With ``distil`` the rows are marked (``"distil": 1``) for the trainer to learn the base model's
    whole next-token distribution at every position instead of the sampled tokens
    (``replay_loss = "kl"``). Texts that come out shorter than two tokens predict nothing and are dropped.
    """
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)} | ({"distil": 1} if distil else {}))
    return rows
