"""The README's file list matches the repository, one line per file.

Rule: the list under the README's "## Architecture" heading (its first indented block) names every
file of the repository and nothing else, where the repository's files are those git tracks plus
those it would track (untracked and not ignored by .gitignore), as long as they exist on disk. So a
file added, split off or renamed without its README line, or a README line left behind after a
file was removed, fails this test with the names to fix. Each line is a path (its first word) and a
description; wildcards and folders do not count as files.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Architecture"


def readme_tree(text: str) -> list[str]:
    """The paths of the first indented block after the architecture heading, in order."""
    lines = text.split("\n")
    start = lines.index(HEADING)
    paths: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("    ") and line.strip():
            paths.append(line.split()[0])
        elif paths and line.strip():
            break  # the block ended: the prose after it is not part of the list
    return paths


def repository_files() -> set[str]:
    """Tracked files plus untracked ones git does not ignore, that exist in the working tree."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode("utf-8")
    return {name for name in out.split("\0") if name and (REPO / name).is_file()}


def test_readme_tree_parser_reads_paths_and_stops_at_the_block_end():
    text = "\n".join([
        "# t", "", HEADING, "", "One line per file:", "",
        "    app.py                 wiring", "    a/very/long/path/name.py  one space is enough", "",
        "Prose after the block.", "", "    not/a/file.py  an indented block further down", "## Next",
    ])
    assert readme_tree(text) == ["app.py", "a/very/long/path/name.py"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs git and a git checkout to list the repository's files")
def test_readme_lists_every_file_of_the_repository_once():
    listed = readme_tree((REPO / "README.md").read_text(encoding="utf-8"))
    assert listed, f"README.md has no file list under {HEADING!r}"
    repeated = sorted({p for p in listed if listed.count(p) > 1})
    files = repository_files()
    missing = sorted(files - set(listed))
    extra = sorted(set(listed) - files)
    problems = []
    if missing:
        problems.append("files missing from the README's list (add one line each):\n  " + "\n  ".join(missing))
    if extra:
        problems.append("README lines naming no file of the repository (remove or fix them):\n  " + "\n  ".join(extra))
    if repeated:
        problems.append("listed more than once:\n  " + "\n  ".join(repeated))
    assert not problems, "\n".join(problems)
