"""``tuneloop backup DEST`` and ``tuneloop restore SRC``: a consistent copy of ``$TUNELOOP_HOME``
while the server writes to it.

Each SQLite database is copied with SQLite's online backup API (a transactionally consistent
snapshot, WAL included; a ``cp`` of a database being written is not). Then the adapter pointer,
the adapters, the dataset snapshots, the reports and ``config.toml``: adapter versions and snapshots
are written once under a hidden name and renamed into place, so a finished one never changes, and
the pointer is copied before the adapters so the version it names is always in the copy. A
``manifest.json`` lists every file with its size and sha256; restore checks them all before it
writes anything and refuses a damaged backup. The base model (``models/``) and library caches are
left out: they are rebuilt from the installed packages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from assistant import paths

MANIFEST = "manifest.json"
FORMAT = 1
FOLDERS = ("adapters", "datasets", "reports")
"""Folders of the home that are backed up, besides the databases and config.toml."""


class BackupError(RuntimeError):
    """A backup or restore is refused; the message says why and what to do."""


def backup(dest: Path) -> dict:
    """Write a backup of the home into the new or empty folder ``dest``; returns its manifest."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty; back up into a new folder")
    home = paths.home()
    if dest.resolve().is_relative_to(home.resolve()):
        raise BackupError(f"{dest} is inside the home {home}; back up to another folder")
    dest.mkdir(parents=True, exist_ok=True)
    for database in sorted(home.glob("*.db")):
        _copy_database(database, dest / database.name)
    pointer = paths.adapters_dir() / "current.json"
    if pointer.exists():  # before the versions: the one it names already exists and is copied below
        (dest / "adapters").mkdir()
        shutil.copy2(pointer, dest / "adapters" / "current.json")
    for name in FOLDERS:
        source = home / name
        if source.is_dir():
            shutil.copytree(source, dest / name, dirs_exist_ok=True,
                            ignore=lambda folder, names: [n for n in names if _skipped(Path(folder) / n, source)])
    if paths.config_file().exists():
        shutil.copy2(paths.config_file(), dest / "config.toml")
    manifest = {"format": FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "home": str(home), "files": _files(dest)}
    paths.write_json_atomic(dest / MANIFEST, manifest)
    return manifest


def restore(src: Path) -> dict:
    """Copy the backup ``src`` into the home, which must hold no database or adapter yet; checks
    every file against the manifest (and the databases' integrity) first. Returns the manifest."""
    src = Path(src)
    manifest = verify(src)
    home = paths.home()
    occupied = [p.name for p in (*home.glob("*.db"), *(home / n for n in FOLDERS), paths.config_file())
                if p.exists() and (p.is_file() or any(p.iterdir()))]
    if occupied:
        raise BackupError(f"the home {home} already holds {', '.join(sorted(occupied))}; restore into an empty "
                          "TUNELOOP_HOME (stop the server, move the old home aside)")
    for relative in manifest["files"]:
        target = home / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / relative, target)
    return manifest


def verify(src: Path) -> dict:
    """The backup's manifest, once every file it lists is present with its size and sha256, no file
    is missing from it, and each database passes SQLite's integrity check; else :class:`BackupError`."""
    try:
        manifest = json.loads((Path(src) / MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{src} is not a tuneloop backup: {MANIFEST} is missing or damaged ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: backup format {manifest.get('format')!r} is not {FORMAT}")
    found = _files(Path(src))
    problems = [f"{name} is missing" for name in sorted(set(files) - set(found))]
    problems += [f"{name} is not in the manifest" for name in sorted(set(found) - set(files))]
    problems += [f"{name} does not match its checksum" for name in sorted(set(files) & set(found))
                 if files[name] != found[name]]
    for name in sorted(n for n in set(files) & set(found) if n.endswith(".db") and files[n] == found[n]):
        # immutable: reading the copy must not create -wal or -shm files beside it.
        conn = sqlite3.connect(f"file:{Path(src) / name}?immutable=1", uri=True)
        try:
            if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                problems.append(f"{name} fails SQLite's integrity check")
        except sqlite3.DatabaseError as exc:
            problems.append(f"{name} is not a readable SQLite database ({exc})")
        finally:
            conn.close()
    if problems:
        raise BackupError(f"{src} is damaged, nothing restored: " + "; ".join(problems))
    return manifest


def _copy_database(source: Path, target: Path) -> None:
    origin = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    copy = sqlite3.connect(target)
    try:
        origin.backup(copy)  # pages copied in one read transaction: a snapshot of committed data
        # One self-contained file: the copy is not left in WAL mode (the server turns WAL on again).
        copy.execute("PRAGMA journal_mode=DELETE")
    finally:
        copy.close()
        origin.close()


def _skipped(path: Path, root: Path) -> bool:
    """Hidden staging folders (unfinished writes), lock files, and the pointer (copied first)."""
    return path.name.startswith(".") or path.suffix == ".lock" or (path.parent == root and path.name == "current.json")


def _files(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": paths.sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def cmd_backup(args) -> int:
    """Back up the home while the server runs: databases by SQLite's online backup, adapters, pointer, dataset snapshots, reports and config, with a manifest of checksums."""
    try:
        manifest = backup(Path(args.dest))
    except BackupError as exc:
        print(f"tuneloop backup: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"dest": str(args.dest), "files": len(manifest["files"]),
                      "bytes": sum(f["bytes"] for f in manifest["files"].values())}))
    return 0


def cmd_restore(args) -> int:
    """Restore a backup into an empty home, after checking every file against its manifest (a damaged backup is refused)."""
    try:
        manifest = restore(Path(args.src))
    except BackupError as exc:
        print(f"tuneloop restore: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"home": str(paths.home()), "files": len(manifest["files"]), "created_at": manifest["created_at"]}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help=cmd_backup.__doc__, description=cmd_backup.__doc__)
    p.add_argument("dest", help="a new or empty folder outside the home")
    p.set_defaults(handler=cmd_backup)
    p = sub.add_parser("restore", help=cmd_restore.__doc__, description=cmd_restore.__doc__)
    p.add_argument("src", help="a folder written by `tuneloop backup`")
    p.set_defaults(handler=cmd_restore)
