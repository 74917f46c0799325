"""Domain packs: import a shipped pack's labelled Q/A pairs and persona into the runtime home.

A pack is a folder under ``assistant/packs/<name>/`` with ``pack.json``, ``qa.jsonl`` (question,
answer, label), ``persona.txt`` (the system prompt) and ``general.txt`` (general text for the
forgetting check). Initialising is idempotent: a second run imports nothing and writes no new
dataset version.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from assistant import paths

DEFAULT_PACK = "peach_state_bank"


@dataclass
class Pack:
    name: str
    title: str
    folder: Path
    qa_file: Path
    persona: str
    general_file: Path


def load_pack(name: str = DEFAULT_PACK) -> Pack:
    """Read a shipped pack's description; unknown names get the list of known ones."""
    folder = paths.pack_dir(name)
    meta = json.loads((folder / "pack.json").read_text(encoding="utf-8"))
    files = meta["files"]
    return Pack(
        name=meta["name"],
        title=meta.get("title", name),
        folder=folder,
        qa_file=folder / files["qa"],
        persona=(folder / files["persona"]).read_text(encoding="utf-8").strip(),
        general_file=folder / files["general"],
    )


def read_passages(file: Path) -> list[str]:
    """The passages of a general-text file: its non-blank lines, stripped (the gate's forgetting
    check and the trainer's forgetting curve read the same format)."""
    return [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]


def install_persona(pack: Pack) -> bool:
    """Make the pack's persona the served system prompt and its title the app's title, unless the
    config file already sets them. Returns whether the config file changed."""
    file = paths.config_file()
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    serve = tomllib.loads(text).get("serve", {}) if text else {}
    lines = []
    if "system_prompt" not in serve:
        # A JSON string is a valid TOML basic string (same escapes), so json.dumps quotes it safely.
        lines.append(f"system_prompt = {json.dumps(pack.persona, ensure_ascii=False)}")
    if "title" not in serve:
        lines.append(f"title = {json.dumps(pack.title + ' assistant', ensure_ascii=False)}")
    if not lines:
        return False
    if "serve" in tomllib.loads(text or ""):
        # Insert right under the existing [serve] header so the keys land in that table.
        head, _, tail = text.partition("[serve]\n")
        text = head + "[serve]\n" + "\n".join(lines) + "\n" + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + "[serve]\n" + "\n".join(lines) + "\n"
    tomllib.loads(text)  # never leave a config file that does not parse
    paths.write_text_atomic(file, text)
    return True


def import_pack(db: sqlite_utils.Database, pack: Pack):
    """Import the pack's Q/A pairs; the first import of a home also fills the frozen test split."""
    from feedback.examples import import_file

    return import_file(db, str(pack.qa_file), question_col="question", answer_col="answer", label_col="label",
                       source="pack")
