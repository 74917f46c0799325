"""Staff users: scrypt password hashes, rate-limited sign-in, and short-lived sign-in tokens.

A password is stored as ``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (base64), so the parameters travel
with the hash and can be raised later without breaking old rows. Every sign-in attempt is recorded
in ``signin_attempts``; after :data:`MAX_FAILURES` failures for one name within
:data:`FAILURE_WINDOW_S` that name is refused until the window has passed. A successful sign-in
gets a random token kept in this process's memory with an expiry; the page holds it in its state
and every staff action presents it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone

import sqlite_utils

from feedback.text import NOT_STORABLE, is_storable

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_FAILURES = 5
FAILURE_WINDOW_S = 15 * 60
TOKEN_TTL_S = 8 * 3600
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Verified against when the name is unknown, so an unknown name costs the same time as a known one.
_DUMMY_HASH: str | None = None


class AuthError(PermissionError):
    """A sign-in or staff action is refused; the message says why (never which half was wrong)."""


def hash_password(password: str) -> str:
    """A self-describing scrypt hash of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the ``stored`` hash (constant-time comparison)."""
    try:
        scheme, params, salt, digest = stored.split("$")
        settings = dict(item.split("=") for item in params.split(","))
        n, r, p = int(settings["n"]), int(settings["r"]), int(settings["p"])
        salt_bytes, expected = base64.b64decode(salt), base64.b64decode(digest)
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt":
        return False
    return hmac.compare_digest(_scrypt(password, salt_bytes, n, r, p, len(expected)), expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int = HASH_BYTES) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=128 * n * r * p + (1 << 20), dklen=length)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def check_name(name: str) -> str:
    """A staff name as stored: letters, digits, '.', '_', '-', at most 64 characters."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise AuthError("A staff name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    return name


def add_staff(db: sqlite_utils.Database, name: str, password: str) -> str:
    """Create staff user ``name`` (or reset its password and re-enable it); returns the name."""
    name = check_name(name)
    if not is_storable(password):
        raise AuthError(f"The password {NOT_STORABLE}.")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AuthError(f"A password is {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long.")
    hashed = hash_password(password)
    with db.conn:
        db["staff_users"].upsert(
            {"name": name, "password_hash": hashed, "created_at": _iso(_utcnow()), "disabled": 0}, pk="name"
        )
    return name


def list_staff(db: sqlite_utils.Database) -> list[dict]:
    """Staff users (name, created_at, disabled), never their hashes."""
    return list(db.query("SELECT name, created_at, disabled FROM staff_users ORDER BY name"))


def is_staff(db: sqlite_utils.Database, name: str | None) -> bool:
    """True when ``name`` is an enabled staff user."""
    if not name:
        return False
    rows = list(db.query("SELECT 1 FROM staff_users WHERE name = ? AND disabled = 0", [name]))
    return bool(rows)


def sign_in(db: sqlite_utils.Database, name: str, password: str) -> str:
    """Check a staff name and password; return the name, or raise :class:`AuthError`.

    Refused outright (without checking the password) while the name has had
    :data:`MAX_FAILURES` failed attempts in the last :data:`FAILURE_WINDOW_S` seconds.
    """
    name = (name or "").strip()[:64]
    password = (password or "")[:MAX_PASSWORD_CHARS]
    if not name or not password:
        raise AuthError("Enter your staff name and password.")
    if not (is_storable(name) and is_storable(password)):
        raise AuthError("Wrong staff name or password.")
    since = _iso(_utcnow() - timedelta(seconds=FAILURE_WINDOW_S))
    failures = db.execute(
        "SELECT count(*) FROM signin_attempts WHERE name = ? AND ok = 0 AND created_at > ?", [name, since]
    ).fetchone()[0]
    if failures >= MAX_FAILURES:
        # Not recorded: otherwise someone guessing could keep a colleague locked out forever.
        raise AuthError(
            f"Too many failed sign-ins for {name!r}; try again in {FAILURE_WINDOW_S // 60} minutes."
        )
    row = db.execute("SELECT password_hash FROM staff_users WHERE name = ? AND disabled = 0", [name]).fetchone()
    ok = verify_password(password, row[0] if row else _dummy_hash()) and row is not None
    with db.conn:
        db["signin_attempts"].insert({"name": name, "ok": int(ok), "created_at": _iso(_utcnow())})
    if not ok:
        raise AuthError("Wrong staff name or password.")
    return name


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


class StaffTokens:
    """Sign-in tokens held in memory: ``token -> (staff name, expiry)``; thread-safe.

    Tokens die with the process, which signs everyone out on restart; that is acceptable for a
    staff view and keeps secrets out of the database.
    """

    def __init__(self, ttl_s: float = TOKEN_TTL_S):
        self.ttl_s = ttl_s
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def issue(self, name: str) -> str:
        """A fresh unguessable token for ``name``."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            # Drop expired tokens so the table cannot grow without bound.
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (name, now + self.ttl_s)
        return token

    def require(self, token: str | None) -> str:
        """The staff name the token was issued to; :class:`AuthError` if missing, unknown or expired."""
        if not token or not isinstance(token, str):
            raise AuthError("Staff only: sign in at /staff first.")
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None or entry[1] <= time.monotonic():
                self._tokens.pop(token, None)
                raise AuthError("Your staff sign-in has expired or is not valid; sign in again.")
            return entry[0]

    def revoke(self, token: str | None) -> None:
        """Sign out: the token stops working at once."""
        with self._lock:
            self._tokens.pop(token or "", None)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")
