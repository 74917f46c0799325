"""The adapter store: ``$TUNELOOP_HOME/adapters/<version>/`` folders in PEFT format and the
``current.json`` pointer that says which one serves.

An adapter folder holds ``adapter_model.safetensors`` (never a pickle), ``adapter_config.json`` and
``provenance.json`` (base model id and hash, dataset manifest, train config, ...). The pointer is
rewritten atomically (write to a temp file, then ``os.replace``), so a reader sees the old or the
new version, never a torn file; its ``history`` makes rollback one step.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import time
from pathlib import Path

from assistant import paths

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PROVENANCE_FILE = "provenance.json"
POINTER_FILE = "current.json"
# Formats that unpickle on load, i.e. can run code: refused outright.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(RuntimeError):
    """An adapter is refused; the message says why."""


def new_version() -> str:
    """A fresh, sortable adapter version such as ``v20261128-161530-3fa2``."""
    return time.strftime("v%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)


def adapter_path(version: str) -> Path:
    """The folder of ``version``; refuses names that could escape the adapters folder."""
    if not _VERSION.match(version or ""):
        raise AdapterError(f"{version!r} is not a valid adapter version (letters, digits, '.', '_', '-')")
    return paths.adapters_dir() / version


def validate(folder: Path, base_model_id: str, base_sha256: str) -> dict:
    """Check an adapter folder before it is loaded; return its provenance.

    Refuses: a missing folder, any pickle file, missing or unreadable config or weights, a
    truncated or corrupt safetensors file, and an adapter built for another base model.
    """
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"adapter {folder.name} refused: pickle files ({', '.join(pickles)}) can run code; only {WEIGHTS_FILE} is accepted")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise AdapterError(f"adapter {folder.name} refused: {WEIGHTS_FILE} is missing")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {folder.name} refused: {CONFIG_FILE} is missing or not JSON ({exc})") from exc
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type plus OSError/ValueError
        raise AdapterError(f"adapter {folder.name} refused: {WEIGHTS_FILE} is corrupt or truncated ({exc})") from exc
    if not tensors:
        raise AdapterError(f"adapter {folder.name} refused: {WEIGHTS_FILE} holds no tensors")
    provenance = read_provenance(folder)
    # safetensors has no checksum: flipped bits in tensor data load fine. The trainer records the
    # weights' sha256, so damage on disk is caught here instead of being served.
    recorded = provenance.get("weights_sha256")
    if recorded is not None and recorded != paths.sha256_file(weights):
        raise AdapterError(f"adapter {folder.name} refused: {WEIGHTS_FILE} does not match the sha256 recorded when "
                           "it was trained (damaged on disk)")
    built_for = provenance.get("base_model_sha256")
    if built_for is not None:
        if built_for != base_sha256:
            raise AdapterError(
                f"adapter {folder.name} refused: built for base model {provenance.get('base_model')!r} "
                f"(sha256 {str(built_for)[:12]}), but the server runs {base_model_id!r} (sha256 {base_sha256[:12]})"
            )
    elif config.get("base_model_name_or_path") not in (base_model_id, None):
        raise AdapterError(
            f"adapter {folder.name} refused: built for {config.get('base_model_name_or_path')!r}, "
            f"but the server runs {base_model_id!r}"
        )
    return provenance


def load_hints(folder: Path):
    """The adapter's topic hints (:class:`assistant.hints.TopicHints`), None when it was trained
    without them; refuses a damaged ``hints/`` folder like damaged weights."""
    from assistant.hints import TopicHints

    try:
        return TopicHints.load(folder)
    except ValueError as exc:
        raise AdapterError(f"adapter {folder.name} refused: {exc}") from exc


def read_provenance(folder: Path) -> dict:
    file = folder / PROVENANCE_FILE
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterError(f"adapter {folder.name} refused: {PROVENANCE_FILE} is not JSON ({exc})") from exc


def retrieval_settings(version: str) -> dict | None:
    """The retrieval an adapter was trained with: provenance ``retrieval`` (``{"k", "min_score"}``),
    None when it was trained without references (it is then served without them)."""
    file = adapter_path(version) / PROVENANCE_FILE
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return _retrieval_record(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _retrieval_record(file: str, mtime_ns: int, size: int) -> dict | None:
    # Read once per version of the file: provenance holds the whole dataset manifest, and this is
    # asked on every question.
    record = read_provenance(Path(file).parent).get("retrieval")
    return dict(record) if isinstance(record, dict) and int(record.get("k") or 0) > 0 else None


def pointer_file() -> Path:
    return paths.adapters_dir() / POINTER_FILE


def read_pointer() -> dict:
    """``{"version": str | None, "history": [older versions, newest first], ...}``."""
    file = pointer_file()
    if not file.exists():
        return {"version": None, "history": []}
    return json.loads(file.read_text(encoding="utf-8"))


def current_version() -> str | None:
    """The adapter that should serve now; ``None`` means the base model alone."""
    return read_pointer().get("version")


def set_current(version: str | None, reason: str) -> dict:
    """Point the server at ``version`` (``None`` = base model), remembering the previous one."""
    if version is not None and not (adapter_path(version) / WEIGHTS_FILE).exists():
        raise AdapterError(f"adapter {version} does not exist under {paths.adapters_dir()}")
    pointer = read_pointer()
    if pointer.get("version") == version:
        return pointer
    history = [pointer.get("version")] + list(pointer.get("history", []))
    updated = {
        "version": version,
        "history": history[:50],
        "reason": reason,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    paths.write_json_atomic(pointer_file(), updated)
    return updated


def rollback(reason: str = "rollback") -> dict:
    """Serve the adapter that served before the current one (possibly the base model)."""
    pointer = read_pointer()
    history = list(pointer.get("history", []))
    if not history:
        raise AdapterError("nothing to roll back to: the pointer has no history")
    previous = history.pop(0)
    updated = {
        "version": previous,
        "history": history,
        "reason": reason,
        "rolled_back_from": pointer.get("version"),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    paths.write_json_atomic(pointer_file(), updated)
    return updated


def list_versions() -> list[str]:
    """Every adapter folder that holds weights, oldest first."""
    root = paths.adapters_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / WEIGHTS_FILE).exists() and _VERSION.match(p.name))
