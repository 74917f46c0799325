"""Redaction, erasure and retention of customer text.

Redaction: payment card numbers, IBANs, US social security numbers, e-mail
addresses and phone numbers become typed placeholders (``[CARD]``, ``[IBAN]``, ``[SSN]``,
``[EMAIL]``, ``[PHONE]``) before the text is stored, shown to staff or put in the model's prompt.

Every writer of customer or staff text in :mod:`feedback` calls :func:`redact` at the storage
boundary, and the web app redacts a question before the model sees it, so the stored text, the
prompt and the answer shown back all hold the same placeholders. Candidates are found by pattern
and confirmed by a maintained validator (python-stdnum: Luhn for cards, the IBAN check digits;
phonenumbers for phones), so an order number or an amount is left alone.

Erasure (:func:`erase`, ``tuneloop privacy erase``): a session's or a turn's text leaves every
place that holds it: the turn, its votes' reasons, the staff corrections and approvals of it and
their knowledge entries, its cached question embedding, copies in later turns' conversation
history, and the dataset snapshots on disk. Each owner module deletes its own rows; this module
records the erasure (ids, time, who; never the text) in ``erasures``. Deleted rows are zeroed
(``secure_delete``), the database is rebuilt (VACUUM) and the WAL truncated, so no copy stays in
free space. Adapters trained before cannot forget: :func:`adapters_with_erased_rows` names them.

Retention (:func:`expire`, ``[privacy] keep_days``): the nightly job erases turns older than that
which no staff member corrected or approved, the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import phonenumbers
import sqlite_utils
from stdnum import iban, luhn
from stdnum.us import ssn

from assistant import config, paths

KINDS = ("card", "iban", "ssn", "email", "phone")
"""What can be redacted, in the order it is looked for (a card is found before its digits look like a phone)."""

PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}

# 13 to 19 digits, single spaces or dashes allowed between them; not glued to other digits.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
# Upper case as IBANs are printed; a lower-case word after one is left out by the word boundary.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}[- ]?\d{2}[- ]?\d{4}(?![\d])")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


@dataclass
class PrivacyConfig:
    redact: list[str] = field(default_factory=lambda: list(KINDS))
    """Kinds of personal data replaced by a placeholder before customer text is stored or answered: card, iban, ssn, email, phone (an empty list turns redaction off)."""
    phone_region: str = "US"
    """Country whose phone numbers may be written without a +country code (two letters)."""
    keep_days: int = 0
    """Days a chat turn is kept; the nightly job deletes older turns no staff member corrected or approved (0 = keep forever)."""

    def __post_init__(self) -> None:
        if isinstance(self.redact, str):  # from TUNELOOP_PRIVACY_REDACT="card,iban"
            self.redact = [kind.strip() for kind in self.redact.split(",") if kind.strip()]
        unknown = sorted(set(self.redact) - set(KINDS))
        config.check(not unknown, f"[privacy] redact: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        config.check(len(self.phone_region) == 2 and self.phone_region.isalpha(),
                     "[privacy] phone_region must be a two-letter country code such as \"US\"")
        self.phone_region = self.phone_region.upper()
        config.check(self.keep_days >= 0, "[privacy] keep_days must be 0 (keep turns forever) or a number of days")


def load_config() -> PrivacyConfig:
    """The ``[privacy]`` settings (defaults < config file < ``TUNELOOP_PRIVACY_*``), read on each
    call so every writer sees the file as it is now."""
    return config.load(PrivacyConfig, "privacy")


def redact(text: str | None, cfg: PrivacyConfig | None = None) -> str | None:
    """``text`` with every enabled kind of personal data replaced by its placeholder (None stays None)."""
    if not text:
        return text
    cfg = cfg or load_config()
    kinds = set(cfg.redact)
    if "card" in kinds:
        text = _CARD.sub(lambda m: _checked(m, _is_card, "card"), text)
    if "iban" in kinds:
        text = _IBAN.sub(_iban, text)
    if "ssn" in kinds:
        text = _SSN.sub(lambda m: _checked(m, ssn.is_valid, "ssn"), text)
    if "email" in kinds:
        text = _EMAIL.sub(PLACEHOLDERS["email"], text)
    if "phone" in kinds:
        text = _phones(text, cfg.phone_region)
    return text


def found(text: str | None, cfg: PrivacyConfig | None = None) -> bool:
    """Whether :func:`redact` would change ``text``."""
    return bool(text) and redact(text, cfg) != text


def _checked(match: re.Match, valid, kind: str) -> str:
    return PLACEHOLDERS[kind] if valid(match.group(0)) else match.group(0)


def _iban(match: re.Match) -> str:
    """The longest valid IBAN at the start of the match (a following word in capitals, or a
    reference number after it, may have been taken in too), then the rest as written."""
    candidate = match.group(0)
    for end in range(len(candidate), 14, -1):
        if iban.is_valid(candidate[:end]) and (end == len(candidate) or candidate[end] == " "):
            return PLACEHOLDERS["iban"] + candidate[end:]
    return candidate


def _is_card(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    # All one digit passes Luhn for some lengths (0000 0000 ...); no issuer hands those out.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn.is_valid(digits)


def _phones(text: str, region: str) -> str:
    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
    for start, end in reversed(spans):
        text = text[:start] + PLACEHOLDERS["phone"] + text[end:]
    return text


# --- erasure and retention -----------------------------------------------------------------------

ERASE_CHUNK = 500
"""Turns erased per statement batch (an IN list stays far below SQLite's limit of variables)."""
ADAPTER_DATASET_MANIFEST = "dataset_manifest.json"
"""The copy of its snapshot's manifest every adapter folder holds (trainer.export)."""


class ErasureError(ValueError):
    """An erasure is refused (unknown session or turn); nothing was changed."""


@dataclass
class Erasure:
    """What one erasure removed: ids only, never the text."""

    id: int
    kind: str
    """One of "session", "turn" or "retention"."""
    target: str | None
    """The session id, the turn id, or the retention cut-off time."""
    turn_ids: list[int]
    row_ids: list[str]
    """Dataset row ids of the erased text (``turns:N`` thumbs-up rows, ``corrections:N`` staff rows)."""
    snapshots: list[str]
    """Dataset snapshot versions rewritten without those rows."""
    erased_by: str | None
    created_at: str
    wal_cleared: bool = True
    """False when a reader kept the WAL from being emptied: a copy may stay there until SQLite's next checkpoint."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def erase(db: sqlite_utils.Database, session_id: str | None = None, turn_id: int | None = None,
          erased_by: str | None = None) -> Erasure:
    """Erase one session's (and its client address) or one turn's customer text everywhere it is
    stored; raises :class:`ErasureError`, changing nothing, for an unknown id."""
    from feedback import turns

    if (session_id is None) == (turn_id is None):
        raise ErasureError("name exactly one of a session or a turn")
    if session_id is not None:
        turn_ids = turns.session_turn_ids(db, session_id)
        if turn_ids is None:
            raise ErasureError(f"there is no session {session_id!r}; nothing was erased")
        return _erase(db, "session", session_id, turn_ids, erased_by, sessions=[session_id])
    if db.execute("SELECT 1 FROM turns WHERE id = ?", [int(turn_id)]).fetchone() is None:
        raise ErasureError(f"there is no turn {turn_id}; nothing was erased")
    return _erase(db, "turn", str(int(turn_id)), [int(turn_id)], erased_by, sessions=[])


def expire(db: sqlite_utils.Database, keep_days: int | None = None, now: datetime | None = None) -> int:
    """Erase the turns older than ``keep_days`` (default ``[privacy] keep_days``; 0 keeps all) that
    no staff member corrected or approved, and the client address of sessions that old; returns how
    many turns were erased. A corrected or approved turn is kept whole: it is training data."""
    keep_days = load_config().keep_days if keep_days is None else keep_days
    if keep_days <= 0:
        return 0
    cutoff = ((now or datetime.now(timezone.utc)) - timedelta(days=keep_days)).isoformat(timespec="microseconds")
    turn_ids = [row[0] for row in db.execute(
        "SELECT id FROM turns WHERE created_at < ? AND id NOT IN (SELECT turn_id FROM corrections "
        "WHERE kind IN ('correction', 'approval') AND turn_id IS NOT NULL) ORDER BY id", [cutoff])]
    sessions = [row[0] for row in db.execute(
        "SELECT id FROM sessions WHERE created_at < ? AND address IS NOT NULL", [cutoff])]
    if turn_ids or sessions:
        _erase(db, "retention", cutoff, turn_ids, "retention", sessions)
    return len(turn_ids)


def _erase(db: sqlite_utils.Database, kind: str, target: str | None, turn_ids: list[int], erased_by: str | None,
           sessions: list[str]) -> Erasure:
    # Imported here: turns and store import this module (redact) at load time.
    from feedback import datasets, dedupe, knowledge, store, turns

    created_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    chunks = [turn_ids[i:i + ERASE_CHUNK] for i in range(0, len(turn_ids), ERASE_CHUNK)]
    corrections = [c for chunk in chunks for c in store.corrections_of(db, chunk)]
    questions = [c["question"] for c in corrections] + [row[0] for chunk in chunks for row in db.execute(
        f"SELECT question FROM turns WHERE id IN ({', '.join('?' * len(chunk))})", chunk)]
    row_ids = [f"turns:{t}" for t in turn_ids] + [f"corrections:{c['id']}" for c in corrections]
    # Files first: should this fail, the database is untouched and the same erase can run again.
    snapshots = datasets.erase_rows(db, set(row_ids), created_at)
    # Zeroes what the deletes free instead of leaving it in free pages and the WAL.
    db.execute("PRAGMA secure_delete = ON")
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        knowledge.erase_entries(db, [f"corrections:{c['id']}" for c in corrections])
        for chunk in chunks:
            store.erase_feedback(db, chunk)
            turns.erase_turns(db, chunk)
        turns.forget_addresses(db, sessions)
        dedupe.forget(db, questions)
        erasure_id = db["erasures"].insert({
            "kind": kind, "target": target, "turn_ids": json.dumps(turn_ids), "row_ids": json.dumps(row_ids),
            "snapshots": json.dumps(snapshots), "erased_by": erased_by, "created_at": created_at,
        }).last_pk
    return Erasure(int(erasure_id), kind, target, turn_ids, row_ids, snapshots, erased_by, created_at,
                   wal_cleared=scrub(db))


def scrub(db: sqlite_utils.Database) -> bool:
    """Leave no deleted text in the database files: rebuild the database (VACUUM: earlier versions
    of a row, left in a page's free space by updates made before secure_delete was on, go too),
    then copy the WAL back and truncate it. False when a reader kept the WAL from being emptied."""
    db.execute("VACUUM")
    busy, _frames, _copied = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return busy == 0


def erasures(db: sqlite_utils.Database) -> list[dict]:
    """Every erasure, oldest first: ``{"id", "kind", "target", "turn_ids", "row_ids", "snapshots", "erased_by", "created_at"}``."""
    keys = ("id", "kind", "target", "turn_ids", "row_ids", "snapshots", "erased_by", "created_at")
    rows = db.execute(f"SELECT {', '.join(keys)} FROM erasures ORDER BY id").fetchall()
    return [dict(zip(keys, row)) | {k: json.loads(row[keys.index(k)]) for k in ("turn_ids", "row_ids", "snapshots")}
            for row in rows]


def adapters_with_erased_rows(db: sqlite_utils.Database) -> list[str]:
    """Adapter versions on disk whose training snapshot held rows erased since: their weights may
    still hold the text, until a retrain replaces them and they are deleted."""
    erased = {row_id for erasure in erasures(db) for row_id in erasure["row_ids"]}
    folder = paths.adapters_dir()
    found = []
    for manifest in sorted(folder.glob(f"*/{ADAPTER_DATASET_MANIFEST}")) if erased else []:
        if manifest.parent.name.startswith("."):  # a staging folder, not an adapter (trainer.export)
            continue
        row_ids = json.loads(manifest.read_text(encoding="utf-8")).get("row_ids", {})
        if erased.intersection(row_id for ids in row_ids.values() for row_id in ids):
            found.append(manifest.parent.name)
    return found
