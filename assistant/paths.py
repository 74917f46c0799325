"""Where tuneloop keeps runtime data, and the environment that keeps libraries offline and quiet.

Everything written at run time lives under one folder, ``$TUNELOOP_HOME`` (default
``$XDG_DATA_HOME/tuneloop``, i.e. ``~/.local/share/tuneloop``), like ``LLM_USER_PATH`` in llm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def home() -> Path:
    """The runtime home, created on first use."""
    explicit = os.environ.get("TUNELOOP_HOME")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        root = Path(xdg) / "tuneloop"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def config_file() -> Path:
    return home() / "config.toml"


def models_dir() -> Path:
    return _sub("models")


def adapters_dir() -> Path:
    return _sub("adapters")


def datasets_dir() -> Path:
    return _sub("datasets")


def reports_dir() -> Path:
    return _sub("reports")


def runs_dir() -> Path:
    return _sub("runs")


def feedback_db() -> Path:
    return home() / "feedback.db"


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet_optional_kernels() -> None:
    """bitsandbytes tries to fetch optional CPU kernels from a hub when it is imported and logs a
    warning when it cannot; its built-in kernels serve. Other bitsandbytes warnings stay visible.
    Call before anything imports bitsandbytes (importing transformers' Trainer does)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def configure_environment() -> None:
    """Point every library cache into the home and keep them off the network.

    Called before transformers, huggingface_hub or gradio are imported. ``TUNELOOP_OFFLINE=0`` lets
    a user fetch a hub model id once; everything else stays as set here.
    """
    root = home()
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("MPLCONFIGDIR", str(root / "matplotlib"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        # transformers reads the variable once, at import: one imported earlier (a test session) is told too.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    quiet_optional_kernels()
    if os.environ.get("TUNELOOP_OFFLINE", "1") != "0":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON so readers see the old file or the new one, never half of either."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temp file + ``os.replace`` (atomic on POSIX), fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STAGING_PATTERNS = {"adapters": ".*.partial", "datasets": ".*.tmp"}
"""Hidden folders a writer renames into place when done (adapters by the trainer's export,
snapshots by feedback.datasets); one is left behind only by a process killed mid-write."""


def remove_stale_staging(max_age_s: float = 3600.0) -> list[Path]:
    """Delete staging folders untouched for ``max_age_s``; writers fill them within seconds, so an
    hour-old one belongs to a killed process. Returns what was removed."""
    removed = []
    cutoff = time.time() - max_age_s
    for sub, pattern in STAGING_PATTERNS.items():
        for folder in _sub(sub).glob(pattern):
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def packs_dir() -> Path:
    """Domain packs shipped with tuneloop (catalog, labelled Q/A, persona, general text)."""
    return Path(__file__).resolve().parent / "packs"


def pack_dir(name: str) -> Path:
    """The folder of the shipped pack ``name``; refuses unknown names with the list of known ones."""
    known = sorted(p.name for p in packs_dir().iterdir() if (p / "pack.json").exists())
    if name not in known:
        raise ValueError(f"unknown pack {name!r}; shipped packs: {', '.join(known) or 'none'}")
    return packs_dir() / name
