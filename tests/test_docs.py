"""The documentation matches the repository: the file list, the README's size and links, the settings.

File list: the list under the "## Files" heading of docs/architecture.md (its first indented block)
names every file of the repository and nothing else, where the repository's files are those git
tracks plus those it would track (untracked and not ignored by .gitignore), as long as they exist on
disk. So a file added, split off or renamed without its line, or a line left behind after a file
was removed, fails with the names to fix. Each line is a path (its first word) and a description;
wildcards and folders do not count as files.

README: the whole README.md is at most 12,000 characters (issue 26: a front door; details live in
docs/). Every relative link of README.md and of the docs/ pages (markdown links and <img src>)
names a file that exists, and a #fragment names a heading of the page it points to.

Settings: docs/configuration.md has one table per config section ("## `[serve]`") with one row per
field ("| `port` |"), exactly the fields of that section's dataclass; and every section the code
loads (``load(Cls, "section")`` / ``from_args(Cls, "section", ...)``) is documented.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREE_PAGE = REPO / "docs" / "architecture.md"
HEADING = "## Files"
README_MAX_CHARS = 12_000
CONFIG_PAGE = REPO / "docs" / "configuration.md"


def file_tree(text: str) -> list[str]:
    """The paths of the first indented block after the file-list heading, in order."""
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


def test_file_tree_parser_reads_paths_and_stops_at_the_block_end():
    text = "\n".join([
        "# t", "", HEADING, "", "One line per file:", "",
        "    app.py                 wiring", "    a/very/long/path/name.py  one space is enough", "",
        "Prose after the block.", "", "    not/a/file.py  an indented block further down", "## Next",
    ])
    assert file_tree(text) == ["app.py", "a/very/long/path/name.py"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs git and a git checkout to list the repository's files")
def test_architecture_page_lists_every_file_of_the_repository_once():
    listed = file_tree(TREE_PAGE.read_text(encoding="utf-8"))
    assert listed, f"docs/architecture.md has no file list under {HEADING!r}"
    repeated = sorted({p for p in listed if listed.count(p) > 1})
    files = repository_files()
    missing = sorted(files - set(listed))
    extra = sorted(set(listed) - files)
    problems = []
    if missing:
        problems.append("files missing from the list in docs/architecture.md (add one line each):\n  " + "\n  ".join(missing))
    if extra:
        problems.append("lines in docs/architecture.md naming no file of the repository (remove or fix them):\n  " + "\n  ".join(extra))
    if repeated:
        problems.append("listed more than once:\n  " + "\n  ".join(repeated))
    assert not problems, "\n".join(problems)


def test_readme_is_at_most_12000_characters():
    size = len((REPO / "README.md").read_text(encoding="utf-8"))  # characters, as `wc -m` counts them
    assert size <= README_MAX_CHARS, (
        f"README.md is {size} characters, over {README_MAX_CHARS}: move detail to a docs/ page and link it")


# --- links ---

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)


def links(text: str) -> list[str]:
    """Link targets of a markdown page (markdown links and images, <img src>, <a href>), outside code."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return [m.group(1) for m in _MD_LINK.finditer(text)] + [m.group(1) for m in _HTML_LINK.finditer(text)]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", text).split("\n"):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` that name no existing file, or no heading of the page named."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:: not this repository's files
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            problems.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in heading_anchors(file.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with the anchor #{fragment} in {path or 'this page'}")
    return problems


def test_link_parser_and_anchors():
    text = "\n".join([
        "# Deployment, production and security", "## The bank's own channels", "## Tests", "## Tests",
        "See [cli](cli.md) and ![pic](chat.png \"title\").", '<img src="docs/staff.png" alt="x" width="49%">',
        "`[not](a-link.md)`", "```", "[nor](this.md)", "# Not a heading", "```",
        "[web](https://example.com) [here](#tests)",
    ])
    assert links(text) == ["cli.md", "chat.png", "https://example.com", "#tests", "docs/staff.png"]
    assert heading_anchors(text) == {"deployment-production-and-security", "the-banks-own-channels", "tests", "tests-1"}


def test_readme_and_docs_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    problems = [f"{page.relative_to(REPO)}: {problem}" for page in pages for problem in broken_links(page)]
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_readme_links_only_to_files_in_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    local = [t.partition("#")[0] for t in links(readme) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]
    assert local, "README.md links to no docs page"
    outside = [t for t in local if not t.startswith("docs/")]
    assert not outside, f"README.md links outside docs/: {outside}"


# --- settings ---

def config_sections() -> dict:
    """Each config section and its dataclass."""
    from assistant.config import ServeConfig
    from evals.evaluate import EvalConfig
    from evals.gate import GateConfig
    from evals.report import ReportConfig
    from feedback.curate import CurateConfig
    from feedback.examples import ImportConfig
    from feedback.privacy import PrivacyConfig
    from trainer.config import TrainConfig
    from tuneloop.pipeline import RetrainConfig

    return {"serve": ServeConfig, "train": TrainConfig, "data": ImportConfig, "curate": CurateConfig,
            "eval": EvalConfig, "gate": GateConfig, "retrain": RetrainConfig, "report": ReportConfig,
            "privacy": PrivacyConfig}


def documented_settings(text: str) -> dict[str, list[str]]:
    """Section -> the field names of its table's rows, from "## `[section]`" headings and "| `name` |" rows."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        heading = re.match(r"^## `\[(\w+)\]`\s*$", line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None:
            row = re.match(r"^\| `(\w+)` \|", line)
            if row:
                current.append(row.group(1))
    return sections


def test_settings_parser():
    text = "\n".join(["## Environment", "| `TUNELOOP_HOME` | x |", "## `[serve]`", "", "| field | default |",
                      "| --- | --- |", "| `port` | `7860` | x |", "| `host` | x |", "## Other", "| `nope` | x |"])
    assert documented_settings(text) == {"serve": ["port", "host"]}


def test_configuration_page_documents_every_setting():
    documented = documented_settings(CONFIG_PAGE.read_text(encoding="utf-8"))
    problems = []
    for section, cls in config_sections().items():
        fields = [f.name for f in dataclasses.fields(cls)]
        rows = documented.get(section, [])
        if missing := [f for f in fields if f not in rows]:
            problems.append(f"[{section}] fields missing from docs/configuration.md: {missing}")
        if extra := [r for r in rows if r not in fields]:
            problems.append(f"[{section}] rows naming no field of {cls.__name__}: {extra}")
        if repeated := sorted({r for r in rows if rows.count(r) > 1}):
            problems.append(f"[{section}] rows repeated: {repeated}")
    if extra_sections := sorted(set(documented) - set(config_sections())):
        problems.append(f"documented sections no config class reads: {extra_sections}")
    assert not problems, "\n".join(problems)


def test_every_section_the_code_loads_is_documented():
    call = re.compile(r"\b(?:load|from_args)\(\s*[\w.]+\s*,\s*\"(\w+)\"")
    sources = [REPO / "app.py", *(p for pkg in ("assistant", "feedback", "trainer", "evals", "tuneloop")
                                  for p in sorted((REPO / pkg).rglob("*.py")))]
    used = {m.group(1) for p in sources for m in call.finditer(p.read_text(encoding="utf-8"))}
    assert {"serve", "train", "privacy"} <= used, f"the pattern no longer finds the config loads: {sorted(used)}"
    assert used <= set(config_sections()), f"sections loaded by the code but not in this test and docs/configuration.md: {sorted(used - set(config_sections()))}"
