"""The training job: a fresh base model + LoRA (or QLoRA, or full fine-tuning) on a dataset snapshot,
written as a new adapter folder under ``$TUNELOOP_HOME/adapters/<version>/``.

Reads top to bottom in :func:`main`: open the snapshot, load a fresh base (:mod:`trainer.model`),
encode through the chat template (:mod:`trainer.data`), fit with validation and early stopping and
keep the best weights (:mod:`trainer.loop`), export with provenance (:mod:`trainer.export`).
``python -m trainer.train --config-json FILE`` runs it in its own process (what
:func:`train_in_subprocess` and ``torchrun`` use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from assistant import adapters, paths, progress
from assistant import model as base_models
from assistant.config import ConfigError
from trainer import augment, data, replay
from trainer.config import TrainConfig, resolve
from trainer.export import export
from trainer.loop import fit
from trainer.model import TrainError, for_device, load_for_training

log = logging.getLogger(__name__)


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
    cfg = for_device(cfg)  # precision and batching decided for this device, written beside the adapter as used
    with progress.stages("tuneloop train", 5) as stages:
        stages.start("reading the dataset snapshot")
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

        train_refs, val_refs = _references(cfg, train_rows, val_rows)

        replay_count = round(cfg.replay * len(train_rows))
        stages.start(f"loading the base model {cfg.base_model}"
                     + (f" and sampling {replay_count} replay texts from it" if replay_count else ""))
        info = base_models.prepare(cfg.base_model)
        # Sampled (or read from the cache) before the training model loads, by a copy freed afterwards.
        replay_texts = replay.base_samples(info, replay_count, cfg.device, cfg.seed)
        tokenizer, model = load_for_training(info, cfg)
        stages.start("encoding the examples with the chat template")
        train_set, skipped_train = data.encode_rows(tokenizer, cfg.system_prompt, train_rows, cfg.max_length, train_hints,
                                                    train_refs)
        replay_set = replay.encode_texts(tokenizer, replay_texts, cfg.max_length, distil=cfg.replay_loss == "kl")
        val_set, skipped_val = data.encode_rows(tokenizer, cfg.system_prompt, val_rows, cfg.max_length, val_hints, val_refs)
        _check_sizes(cfg, snapshot, len(train_set), len(val_set), after_max_length=True)

        stages.start(f"training the adapter ({cfg.method})")
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
            stages.start("writing the adapter")
            folder = export(cfg, info, snapshot, tokenizer, model, outcome, result, hints)
            result.adapter, result.path = folder.name, str(folder)
    return result


def _references(cfg: TrainConfig, train_rows: list[dict], val_rows: list[dict]):
    """References of each training and validation prompt (None, None without retrieval): training
    rows draw from the other training rows with RAFT's wrong and missing shares, validation rows
    as serving would, so validation loss follows the served prompt."""
    if not cfg.retrieval_k:
        return None, None
    from feedback import dedupe
    from feedback.db import connect

    # Before the base loads, like the hints; curation embedded these questions already (cache hits).
    cache = dedupe.EmbeddingCache(connect(), persist=False)
    train_vectors = cache.vectors([str(r["question"]) for r in train_rows])
    val_vectors = cache.vectors([str(r["question"]) for r in val_rows])
    train_refs = data.draw_references(train_rows, train_vectors, train_rows, train_vectors, cfg.retrieval_k,
                                      cfg.retrieval_min_score, cfg.retrieval_distractors, cfg.retrieval_missing, cfg.seed)
    val_refs = data.draw_references(train_rows, train_vectors, val_rows, val_vectors, cfg.retrieval_k,
                                    cfg.retrieval_min_score)
    return train_refs, val_refs


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
