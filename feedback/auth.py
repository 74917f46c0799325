"""Staff users, throttled sign-in, and server-side staff sessions.

Passwords are stored as argon2id hashes (argon2-cffi) at OWASP's recommended parameters (19 MiB,
2 passes, 1 lane). Hashes made with older parameters, including this module's earlier
``scrypt$n=16384,...`` format, still verify and are replaced at the member's next successful sign-in.

Sign-in throttling cannot be turned against staff: no name is ever locked. Before any password is
hashed, the attempt takes a place in a global budget of hashes per minute (the CPU sign-in may
take from answering customers) and a per-address budget, and a (name, address) pair with repeated
failures waits an exponential backoff. The checks and the recording of the attempt run in one
IMMEDIATE transaction, so concurrent attempts cannot all pass a check only one of them should.

A successful sign-in creates a row in ``staff_sessions`` and returns a random token for an HttpOnly
cookie; the table keeps only the token's sha256. Sessions expire, and end on sign-out, password
change (``add_staff`` again or :func:`set_password`), :func:`disable_staff` and :func:`remove_staff`.
:func:`unlock_staff` clears a name's backoff (from every address) without deleting the record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import argon2
import sqlite_utils

from feedback.text import NOT_STORABLE, is_storable

# OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_PARALLELISM = 1
FAILURE_WINDOW_S = 15 * 60
SESSION_TTL_S = 8 * 3600
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
TOKEN_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASHER = argon2.PasswordHasher(
    time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM
)
# Verified against when the name is unknown, so an unknown name costs the same time as a known one.
_DUMMY_HASH: str | None = None
BUSY = "Too many sign-in attempts right now; please try again in a minute."
WRONG = "Wrong staff name or password."


class AuthError(PermissionError):
    """A sign-in or staff action is refused; the message says why (never which half was wrong)."""


@dataclass(frozen=True)
class SigninLimits:
    """How many password hashes sign-in may compute, and the backoff after failures."""

    hashes_per_minute: int = 60
    hashes_per_address_per_minute: int = 10
    backoff_after_failures: int = 3
    max_backoff_s: float = 300.0


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` with a fresh random salt (self-describing PHC string)."""
    return _HASHER.hash(password)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the ``stored`` hash (argon2id, or the older scrypt format)."""
    if stored.startswith("scrypt$"):
        return _verify_scrypt(password, stored)
    try:
        return _HASHER.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with another scheme or weaker parameters than today's."""
    if not stored.startswith("$argon2id$"):
        return True
    try:
        return _HASHER.check_needs_rehash(stored)
    except argon2.exceptions.InvalidHashError:
        return True


def _verify_scrypt(password: str, stored: str) -> bool:
    try:
        _scheme, params, salt, digest = stored.split("$")
        settings = dict(item.split("=") for item in params.split(","))
        n, r, p = int(settings["n"]), int(settings["r"]), int(settings["p"])
        salt_bytes, expected = base64.b64decode(salt), base64.b64decode(digest)
    except (ValueError, KeyError):
        return False
    actual = hashlib.scrypt(password.encode("utf-8"), salt=salt_bytes, n=n, r=r, p=p,
                            maxmem=128 * n * r * p + (1 << 20), dklen=len(expected))
    return hmac.compare_digest(actual, expected)


def check_name(name: str) -> str:
    """A staff name as stored: letters, digits, '.', '_', '-', at most 64 characters."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise AuthError("A staff name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    return name


def add_staff(db: sqlite_utils.Database, name: str, password: str) -> str:
    """Create staff user ``name`` (or reset its password and re-enable it); returns the name.

    A reset ends every session of that user: whoever signed in with the old password is out.
    """
    name = check_name(name)
    _check_password(password)
    hashed = hash_password(password)
    with _transaction(db):
        # Sessions first: sqlite-utils commits at its own write, which must be the last statement.
        db.execute("DELETE FROM staff_sessions WHERE name = ?", [name])
        db["staff_users"].upsert(
            {"name": name, "password_hash": hashed, "created_at": _iso(_utcnow()), "disabled": 0}, pk="name"
        )
    return name


def _check_password(password: str) -> None:
    if not is_storable(password):
        raise AuthError(f"The password {NOT_STORABLE}.")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AuthError(f"A password is {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long.")


def disable_staff(db: sqlite_utils.Database, name: str) -> int:
    """Disable staff user ``name`` and end all their sessions; returns the sessions ended."""
    name = check_name(name)
    with _transaction(db):
        if db.execute("SELECT 1 FROM staff_users WHERE name = ?", [name]).fetchone() is None:
            raise AuthError(f"There is no staff user {name!r}.")
        db.execute("UPDATE staff_users SET disabled = 1 WHERE name = ?", [name])
        return db.execute("DELETE FROM staff_sessions WHERE name = ?", [name]).rowcount


def enable_staff(db: sqlite_utils.Database, name: str) -> str:
    """Enable disabled staff user ``name`` again with their old password; returns the name."""
    name = check_name(name)
    with _transaction(db):
        if db.execute("UPDATE staff_users SET disabled = 0 WHERE name = ?", [name]).rowcount == 0:
            raise AuthError(f"There is no staff user {name!r}.")
    return name


def set_password(db: sqlite_utils.Database, name: str, password: str) -> int:
    """Give existing staff user ``name`` a new password and end all their sessions; returns the sessions ended.

    Unlike :func:`add_staff` it never creates a user and leaves a disabled user disabled.
    """
    name = check_name(name)
    _check_password(password)
    hashed = hash_password(password)
    with _transaction(db):
        if db.execute("UPDATE staff_users SET password_hash = ? WHERE name = ?", [hashed, name]).rowcount == 0:
            raise AuthError(f"There is no staff user {name!r}.")
        return db.execute("DELETE FROM staff_sessions WHERE name = ?", [name]).rowcount


def remove_staff(db: sqlite_utils.Database, name: str) -> int:
    """Delete staff user ``name`` and their sessions; returns the sessions ended.

    Refused when they have saved corrections, approvals or examples: the gold data keeps who wrote
    it, so such a member can only be disabled.
    """
    name = check_name(name)
    with _transaction(db):
        if db.execute("SELECT 1 FROM staff_users WHERE name = ?", [name]).fetchone() is None:
            raise AuthError(f"There is no staff user {name!r}.")
        written = db.execute("SELECT count(*) FROM corrections WHERE staff_user = ?", [name]).fetchone()[0]
        if written:
            raise AuthError(f"{name} wrote {written} correction(s), approval(s) or example(s), which keep their "
                            f"name; use `tuneloop staff disable {name}` instead.")
        ended = db.execute("DELETE FROM staff_sessions WHERE name = ?", [name]).rowcount
        db.execute("DELETE FROM staff_users WHERE name = ?", [name])
        return ended


def unlock_staff(db: sqlite_utils.Database, name: str) -> int:
    """Clear the sign-in backoff of ``name`` from every address; returns the failures forgiven.

    The failures stay in ``signin_attempts`` (they still count against the per-minute hash
    budgets); only the backoff, which counts failures after the last unlock, starts again.
    """
    name = check_name(name)
    with _transaction(db):
        if db.execute("SELECT 1 FROM staff_users WHERE name = ?", [name]).fetchone() is None:
            raise AuthError(f"There is no staff user {name!r}.")
        # ok = 2: a failure staff have forgiven (see _backoff_left, which counts only ok = 0).
        return db.execute("UPDATE signin_attempts SET ok = 2 WHERE name = ? AND ok = 0", [name]).rowcount


def list_staff(db: sqlite_utils.Database) -> list[dict]:
    """Staff users (name, created_at, disabled), never their hashes."""
    return list(db.query("SELECT name, created_at, disabled FROM staff_users ORDER BY name"))


def is_staff(db: sqlite_utils.Database, name: str | None) -> bool:
    """True when ``name`` is an enabled staff user."""
    if not name:
        return False
    rows = list(db.query("SELECT 1 FROM staff_users WHERE name = ? AND disabled = 0", [name]))
    return bool(rows)


def sign_in(db: sqlite_utils.Database, name: str, password: str, address: str | None = None,
            limits: SigninLimits = SigninLimits()) -> str:
    """Check a staff name and password; return the name, or raise :class:`AuthError`.

    Refused without hashing (and without being recorded) when the global or ``address``'s hash
    budget for the last minute is spent, or while this name and address wait out their backoff.
    """
    name = (name or "").strip()[:64]
    password = (password or "")[:MAX_PASSWORD_CHARS]
    address = (address or "unknown")[:64]
    if not name or not password:
        raise AuthError("Enter your staff name and password.")
    if not (is_storable(name) and is_storable(password)):
        raise AuthError(WRONG)
    now = _utcnow()
    with _transaction(db):
        minute_ago = _iso(now - timedelta(seconds=60))
        overall = db.execute("SELECT count(*) FROM signin_attempts WHERE created_at > ?", [minute_ago]).fetchone()[0]
        from_address = db.execute(
            "SELECT count(*) FROM signin_attempts WHERE address = ? AND created_at > ?", [address, minute_ago]
        ).fetchone()[0]
        if overall >= limits.hashes_per_minute or from_address >= limits.hashes_per_address_per_minute:
            raise AuthError(BUSY)
        wait = _backoff_left(db, name, address, now, limits)
        if wait > 0:
            raise AuthError(f"Too many failed sign-ins; try again in {int(wait) + 1} seconds.")
        # Recorded as a failure until the password is checked: an attempt in flight counts.
        attempt = db["signin_attempts"].insert(
            {"name": name, "ok": 0, "address": address, "created_at": _iso(now)}
        ).last_pk
    row = db.execute("SELECT password_hash FROM staff_users WHERE name = ? AND disabled = 0", [name]).fetchone()
    ok = verify_password(password, row[0] if row else _dummy_hash()) and row is not None
    if not ok:
        raise AuthError(WRONG)
    upgraded = hash_password(password) if needs_rehash(row[0]) else None
    with _transaction(db):
        db.execute("UPDATE signin_attempts SET ok = 1 WHERE id = ?", [attempt])
        if upgraded:
            db.execute("UPDATE staff_users SET password_hash = ? WHERE name = ? AND password_hash = ?",
                       [upgraded, name, row[0]])
    return name


def _backoff_left(db, name: str, address: str, now: datetime, limits: SigninLimits) -> float:
    """Seconds this name and address must still wait: 1, 2, 4, ... after the allowed failures."""
    since = _iso(now - timedelta(seconds=FAILURE_WINDOW_S))
    failures, last = db.execute(
        "SELECT count(*), max(created_at) FROM signin_attempts "
        "WHERE name = ? AND address = ? AND ok = 0 AND created_at > ?",
        [name, address, since],
    ).fetchone()
    if failures < limits.backoff_after_failures:
        return 0.0
    delay = min(2.0 ** (failures - limits.backoff_after_failures), limits.max_backoff_s)
    return delay - (now - datetime.fromisoformat(last)).total_seconds()


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def create_session(db: sqlite_utils.Database, name: str, ttl_s: float = SESSION_TTL_S, address: str | None = None) -> str:
    """A new session for signed-in staff member ``name``; returns its token (for the cookie only)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = _utcnow()
    with _transaction(db):
        # Expired sessions are dropped here, so the table cannot grow without bound.
        db.execute("DELETE FROM staff_sessions WHERE expires_at <= ?", [_iso(now)])
        db["staff_sessions"].insert({
            "token_hash": _token_hash(token), "name": name, "address": (address or "")[:64] or None,
            "created_at": _iso(now), "expires_at": _iso(now + timedelta(seconds=ttl_s)),
        })
    return token


def session_staff(db: sqlite_utils.Database, token: str | None) -> str | None:
    """The enabled staff member a live session token belongs to, or None."""
    if not token or not isinstance(token, str) or len(token) > 256:
        return None
    row = db.execute(
        "SELECT s.name FROM staff_sessions s JOIN staff_users u ON u.name = s.name "
        "WHERE s.token_hash = ? AND s.expires_at > ? AND u.disabled = 0",
        [_token_hash(token), _iso(_utcnow())],
    ).fetchone()
    return row[0] if row else None


def end_session(db: sqlite_utils.Database, token: str | None) -> None:
    """Sign out: the session of ``token`` stops working at once."""
    if token and isinstance(token, str):
        with _transaction(db):
            db.execute("DELETE FROM staff_sessions WHERE token_hash = ?", [_token_hash(token)])


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@contextmanager
def _transaction(db: sqlite_utils.Database) -> Iterator[None]:
    with db.conn:
        # IMMEDIATE takes the write lock before the checks: two concurrent sign-ins cannot both
        # pass a budget check that only one of them should.
        db.execute("BEGIN IMMEDIATE")
        yield


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")
