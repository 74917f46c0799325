"""Writing the adapter folder: the weights (safetensors only), topic hints, resolved train config,
dataset manifest, loss history and plot, and ``provenance.json`` (base id + sha256, chat template,
library versions, result), staged and renamed into place whole.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from assistant import adapters, paths
from assistant.hints import TopicHints
from trainer import data, replay
from trainer.config import TrainConfig
from trainer.loop import FitOutcome

if TYPE_CHECKING:  # for the annotation only: trainer.train imports this module
    from trainer.train import TrainResult

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors")


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
                # Served with exactly these settings; absent, the adapter is served without references.
                "retrieval": {"k": cfg.retrieval_k, "min_score": cfg.retrieval_min_score,
                              "distractors": cfg.retrieval_distractors, "missing": cfg.retrieval_missing}
                if cfg.retrieval_k else None,
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
