"""Dataset snapshots: ``$TUNELOOP_HOME/datasets/<version>/`` with versions ``d0001``, ``d0002``, ...

Each snapshot holds ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``, one row per line, exactly
``{"id": str, "question": str, "answer": str, "label": str | null, "source": str}`` (source one of
:data:`ROW_SOURCES`), and ``manifest.json`` (row ids, counts per source and label per split, the
sha256 of each file, what changed against the previous version and why, created_at, config).

A snapshot is written into a hidden temporary folder and renamed into place, so a crash or a full
disk mid-write leaves the previous version as it was and no half-written version visible. The
trainer and evaluator read snapshots only through :func:`latest_snapshot` and :func:`load_split`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from assistant import paths

SPLITS = ("train", "val", "test")
ROW_SOURCES = ("import", "pack", "manual", "correction", "approval", "thumbs_up")
ROW_KEYS = ("id", "question", "answer", "label", "source")
_VERSION = re.compile(r"^d(\d{4,})$")


def version_name(number: int) -> str:
    return f"d{number:04d}"


def snapshots() -> list[Path]:
    """Complete snapshot folders (holding manifest.json), oldest first."""
    found = []
    for child in paths.datasets_dir().iterdir():
        match = _VERSION.match(child.name)
        if match and child.is_dir() and (child / "manifest.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_snapshot() -> Path | None:
    """The highest-numbered snapshot folder that holds a manifest.json, or None."""
    found = snapshots()
    return found[-1] if found else None


class DatasetError(ValueError):
    """A snapshot is missing, malformed or too small to use; the message names the file and line."""


def load_split(path: Path | str, split: str) -> list[dict]:
    """The rows of one split of a snapshot folder, in file order.

    Every row is checked, so a hand-made or damaged snapshot fails here with the file and line
    rather than deep inside training or evaluation.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    file = Path(path) / f"{split}.jsonl"
    if not file.is_file():
        raise DatasetError(f"{file} is missing; a snapshot needs {', '.join(s + '.jsonl' for s in SPLITS)}")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{file}:{number}: not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{file}:{number}: expected a JSON object, got {type(row).__name__}")
        if not str(row.get("question") or "").strip() or not str(row.get("answer") or "").strip():
            raise DatasetError(f"{file}:{number}: row {row.get('id')!r} needs a non-empty question and answer")
        rows.append(row)
    return rows


def load_manifest(path: Path | str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))


def render_split(rows: list[dict]) -> bytes:
    """The bytes of one split file: one JSON object per line, keys in :data:`ROW_KEYS` order."""
    lines = [json.dumps({key: row[key] for key in ROW_KEYS}, ensure_ascii=False) + "\n" for row in rows]
    return "".join(lines).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_version(db: sqlite_utils.Database) -> str:
    """One past the highest version on disk or recorded in the database."""
    numbers = [int(_VERSION.match(p.name).group(1)) for p in paths.datasets_dir().iterdir() if _VERSION.match(p.name)]
    numbers += [int(_VERSION.match(r["version"]).group(1)) for r in db.query("select version from dataset_versions")]
    return version_name(max(numbers, default=0) + 1)


def write_snapshot(db: sqlite_utils.Database, version: str, files: dict[str, bytes], manifest: dict) -> Path:
    """Write the split files and manifest to a temporary folder, fsync, rename it to ``version``,
    then record the version in the database. On any error nothing new is left behind."""
    root = paths.datasets_dir()
    final = root / version
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{version}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        _write_file(tmp / "manifest.json", manifest_bytes)
        # os.rename of a folder fails if the target exists: two curations cannot take one version.
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    counts = manifest["counts"]
    with db.conn:
        db["dataset_versions"].insert({
            "version": version, "path": str(final), "manifest_sha256": sha256_bytes(manifest_bytes),
            "train": counts["train"], "val": counts["val"], "test": counts["test"],
            "created_at": manifest["created_at"],
        })
    return final


def erase_rows(db: sqlite_utils.Database, row_ids: set[str], erased_at: str) -> list[str]:
    """Take the rows ``row_ids`` (``"turns:3"``, ``"corrections:7"``) out of every snapshot that holds
    them, so no copy of their text stays on disk; returns the versions rewritten.

    The split files are replaced first, then the manifest (row ids, counts and file hashes of what
    is left, and an ``erased`` entry with the ids and time, never the text), each with ``os.replace``,
    then the version's row in ``dataset_versions``. A snapshot changed this way has a new manifest
    hash, so the next retrain does not take it for one it already trained on.
    """
    rewritten = []
    for folder in snapshots() if row_ids else []:
        splits = {split: load_split(folder, split) for split in SPLITS}
        if not any(row["id"] in row_ids for rows in splits.values() for row in rows):
            continue
        manifest = load_manifest(folder)
        erased = {split: [row["id"] for row in rows if row["id"] in row_ids] for split, rows in splits.items()}
        splits = {split: [row for row in rows if row["id"] not in row_ids] for split, rows in splits.items()}
        files = {f"{split}.jsonl": render_split(rows) for split, rows in splits.items()}
        for name, data in files.items():
            _replace_file(folder / name, data)
        for split, rows in splits.items():
            manifest["files"][f"{split}.jsonl"] = {"sha256": sha256_bytes(files[f"{split}.jsonl"]), "rows": len(rows)}
            manifest["counts"][split] = len(rows)
            manifest["row_ids"][split] = [row["id"] for row in rows]
            manifest["by_source"][split] = _tally(row["source"] for row in rows)
            manifest["by_label"][split] = _tally(row["label"] or "(none)" for row in rows)
            added = manifest.get("changes", {}).get("added", {})
            if split in added:
                added[split] = [row_id for row_id in added[split] if row_id not in row_ids]
        manifest["dropped_rows"] = {k: v for k, v in manifest.get("dropped_rows", {}).items() if k not in row_ids}
        manifest.setdefault("erased", []).append({"at": erased_at, "row_ids": erased})
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        _replace_file(folder / "manifest.json", manifest_bytes)
        with db.conn:  # a hand-made snapshot folder has no row, and needs none
            db.execute("UPDATE dataset_versions SET manifest_sha256 = ?, train = ?, val = ?, test = ? WHERE version = ?",
                       [sha256_bytes(manifest_bytes), *(manifest["counts"][split] for split in SPLITS), folder.name])
        rewritten.append(folder.name)
    return rewritten


def _tally(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it over it: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
