"""Domain packs: import a shipped pack's labelled Q/A pairs and persona into the runtime home.

A pack is a folder under ``assistant/packs/<name>/`` with ``pack.json``, ``qa.jsonl`` (question,
answer, label), ``persona.txt`` (the system prompt) and ``general.txt`` (general text for the
forgetting check). Initialising is idempotent: a second run imports nothing and writes no new
dataset version.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils
import tomlkit

from assistant import paths
from assistant.config import ConfigError

DEFAULT_PACK = "peach_state_bank"


@dataclass
class Pack:
    name: str
    title: str
    folder: Path
    qa_file: Path
    persona: str
    general_file: Path
    catalog_file: Path | None = None
    """The products and their facts (``catalog.json``), indexed as passages by feedback.knowledge."""
    bank: dict = field(default_factory=dict)
    """Facts about the business itself (phone, hours, ...) from ``pack.json``."""
    chat: dict = field(default_factory=dict)
    """The customer chat's ``welcome``, ``examples`` (a list) and ``disclaimer`` from ``pack.json``; each optional."""


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
        catalog_file=folder / files["catalog"] if "catalog" in files else None,
        bank=dict(meta.get("bank", {})),
        chat=dict(meta.get("chat", {})),
    )


def read_passages(file: Path) -> list[str]:
    """The passages of a general-text file: its non-blank lines, stripped (the gate's forgetting
    check and the trainer's forgetting curve read the same format)."""
    return [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]


def install_persona(pack: Pack) -> bool:
    """Make the pack's persona the served system prompt, its title the app's title, and its chat
    welcome, example questions and disclaimer those of the customer chat, unless the config file
    already sets them. Returns whether the config file changed.

    The file is edited with tomlkit, so the user's comments, layout and other tables stay as written.
    """
    file = paths.config_file()
    try:
        text = file.read_text(encoding="utf-8") if file.exists() else ""
        # tomllib is what the config loader reads with; refuse here exactly what it would refuse.
        serve = tomllib.loads(text).get("serve", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc}); fix or delete the file") from exc
    if not isinstance(serve, dict):
        raise ConfigError(f"{file}: 'serve' must be a table ([serve] followed by 'name = value' lines)")
    wanted = {"system_prompt": pack.persona, "title": pack.title + " assistant"}
    wanted |= {key: pack.chat[key] for key in ("welcome", "disclaimer") if key in pack.chat}
    if "examples" in pack.chat:
        wanted["examples"] = " | ".join(pack.chat["examples"])  # [serve] examples: one string, '|' between
    missing = {key: value for key, value in wanted.items() if key not in serve}
    if not missing:
        return False
    document = tomlkit.parse(text)
    if "serve" not in document:
        document.add("serve", tomlkit.table())
    _add_settings(document["serve"], missing)
    text = tomlkit.dumps(document)
    tomllib.loads(text)  # never leave a config file that does not parse
    paths.write_text_atomic(file, text)
    return True


# Room past the pack's 99th-percentile answer: the model's answers run wordier than the written ones
# (it restates the question, adds a closing line) and should still end by themselves, not at the limit.
ANSWER_TOKENS_MARGIN = 1.5


def answer_token_budget(pack: Pack, count_tokens: Callable[[str], int]) -> int:
    """``[serve] max_new_tokens`` sized from the pack: the 99th percentile of its answers' lengths in
    the base model's tokens (``count_tokens``), times :data:`ANSWER_TOKENS_MARGIN`, rounded up to 8."""
    lengths = sorted(count_tokens(row["answer"]) for row in _qa_rows(pack))
    if not lengths:
        raise ConfigError(f"{pack.qa_file}: no answers to size max_new_tokens from")
    p99 = lengths[min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)]  # nearest-rank percentile
    return min(4096, 8 * math.ceil(p99 * ANSWER_TOKENS_MARGIN / 8))


def install_max_new_tokens(pack: Pack, count_tokens: Callable[[str], int]) -> int | None:
    """Write :func:`answer_token_budget` as ``[serve] max_new_tokens`` unless the config file sets it
    already; returns the value written, None when the file was left as it is."""
    file = paths.config_file()
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    if "max_new_tokens" in tomllib.loads(text).get("serve", {}):
        return None
    budget = answer_token_budget(pack, count_tokens)
    document = tomlkit.parse(text)
    if "serve" not in document:
        document.add("serve", tomlkit.table())
    _add_settings(document["serve"], {"max_new_tokens": budget})
    text = tomlkit.dumps(document)
    tomllib.loads(text)  # never leave a config file that does not parse
    paths.write_text_atomic(file, text)
    return budget


def _qa_rows(pack: Pack) -> list[dict]:
    with pack.qa_file.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _add_settings(table, settings: dict[str, str]) -> None:
    """Add settings to a parsed tomlkit table after its last setting.

    tomlkit parses the blank line and comments that come before the next ``[table]`` header as the
    end of this table, so a plain append would put our settings under a comment written about the
    next table. They are set aside (from the first blank line on) and put back after our settings.
    """
    # An inline table or a table split around others has no such trailer to keep in place.
    body = table.value.body if isinstance(table, tomlkit.items.Table) else []
    blank = [i for i, (key, item) in enumerate(body) if key is None and isinstance(item, tomlkit.items.Whitespace)]
    settings_end = max((i + 1 for i, (key, _) in enumerate(body) if key is not None), default=0)
    start = min((i for i in blank if i >= settings_end), default=len(body))
    trailer = [item for _, item in body[start:]]
    del body[start:]  # keyless items only: tomlkit's index of keys still points at the right rows
    for key, value in settings.items():
        table[key] = value
    for item in trailer:
        table.raw_append(None, item)


def import_pack(db: sqlite_utils.Database, pack: Pack):
    """Import the pack's Q/A pairs; the first import of a home also fills the frozen test split."""
    from feedback.examples import import_file

    return import_file(db, str(pack.qa_file), question_col="question", answer_col="answer", label_col="label",
                       source="pack")
