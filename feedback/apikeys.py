"""API keys of the bank's own channels (its web site, its app's backend) for the OpenAI-compatible
API (:mod:`feedback.api`), and the ``tuneloop apikey`` commands.

A key is 32 random bytes shown once, when it is created; the ``api_keys`` table keeps only its
sha256 (a key is random, so a plain hash cannot be reversed by guessing, unlike a password). A
revoked key stops working at its next request and keeps its row, so its name is not reused for
another client by mistake. Each key carries its own rate limit (requests per minute). A test key
(``--test``: monitoring probes, a channel's automated tests) opens sessions of kind "test", which the
review queue hides by default and training never uses.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
from datetime import datetime, timedelta, timezone

import sqlite_utils

PREFIX = "tl-"
KEY_BYTES = 32
DEFAULT_PER_MINUTE = 60
MAX_PER_MINUTE = 100_000
LAST_USED_EVERY_S = 60
"""``last_used_at`` is written at most this often per key: not a write on every request."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ApiKeyError(ValueError):
    """A key cannot be created or revoked as asked; the message says why."""


def create_key(db: sqlite_utils.Database, name: str, per_minute: int = DEFAULT_PER_MINUTE, test: bool = False) -> str:
    """Create the key ``name`` allowed ``per_minute`` requests a minute (a test key's turns are marked
    "test"); returns the key (only here)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiKeyError("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not 1 <= int(per_minute) <= MAX_PER_MINUTE:
        raise ApiKeyError(f"--per-minute must be between 1 and {MAX_PER_MINUTE}")
    key = PREFIX + secrets.token_urlsafe(KEY_BYTES)
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        if db.execute("SELECT 1 FROM api_keys WHERE name = ?", [name]).fetchone():
            raise ApiKeyError(f"a key named {name!r} exists (revoked keys keep their name); choose another name")
        db["api_keys"].insert({"name": name, "key_hash": _hash(key), "per_minute": int(per_minute),
                               "created_at": _iso(_utcnow()), "test": int(bool(test))})
    return key


def revoke_key(db: sqlite_utils.Database, name: str) -> bool:
    """Revoke the key ``name``; False if there is no such live key."""
    with db.conn:
        cursor = db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                            [_iso(_utcnow()), name])
    return cursor.rowcount > 0


def list_keys(db: sqlite_utils.Database) -> list[dict]:
    """Every key's name, rate limit, whether it is a test key, and dates (never the key or its hash), oldest first."""
    keys = [dict(zip(("name", "per_minute", "test", "created_at", "revoked_at", "last_used_at"), row)) for row in db.execute(
        "SELECT name, per_minute, test, created_at, revoked_at, last_used_at FROM api_keys ORDER BY created_at").fetchall()]
    return [{**key, "test": bool(key["test"])} for key in keys]


def authenticate(db: sqlite_utils.Database, key: str | None) -> dict | None:
    """``{"name", "per_minute", "test"}`` of the live key ``key``; None for a missing, unknown or revoked one."""
    if not key or not isinstance(key, str) or not key.startswith(PREFIX) or len(key) > 200:
        return None
    row = db.execute("SELECT name, per_minute, test, last_used_at FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                     [_hash(key)]).fetchone()
    if row is None:
        return None
    name, per_minute, test, last_used = row
    now = _utcnow()
    if last_used is None or datetime.fromisoformat(last_used) < now - timedelta(seconds=LAST_USED_EVERY_S):
        with db.conn:
            db.execute("UPDATE api_keys SET last_used_at = ? WHERE name = ?", [_iso(now), name])
    return {"name": name, "per_minute": per_minute, "test": bool(test)}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def cmd_apikey_create(args) -> int:
    """Create an API key for one of the bank's channels and print it once (only its hash is stored)."""
    from feedback.db import connect

    try:
        key = create_key(connect(), args.name, args.per_minute, args.test)
    except ApiKeyError as exc:
        print(f"tuneloop apikey create: {exc}", file=sys.stderr)
        return 2
    print(key)
    kind = "test key" if args.test else "key"
    print(f"tuneloop: {kind} {args.name!r} created ({args.per_minute} requests a minute); it is shown only now, "
          "store it in the channel's secret store", file=sys.stderr)
    return 0


def cmd_apikey_list(args) -> int:
    """List API keys: name, rate limit, created, revoked, last used (never the keys)."""
    import json

    from feedback.db import connect

    keys = list_keys(connect())
    if args.json:
        print(json.dumps(keys))
    for key in [] if args.json else keys:
        state = f"revoked {key['revoked_at'][:19]}" if key["revoked_at"] else "live"
        print(f"{key['name'] + (' (test)' if key['test'] else ''):<24} {key['per_minute']:>6}/min  created {key['created_at'][:19]}  {state}  "
              f"last used {(key['last_used_at'] or 'never')[:19]}")
    return 0


def cmd_apikey_revoke(args) -> int:
    """Revoke an API key: its next request gets 401."""
    from feedback.db import connect

    if not revoke_key(connect(), args.name):
        print(f"tuneloop apikey revoke: no live key named {args.name!r}", file=sys.stderr)
        return 2
    print(f"tuneloop: key {args.name!r} revoked")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apikey", help="manage API keys of the OpenAI-compatible API",
                       description="Manage API keys of the OpenAI-compatible API (/v1/...).")
    keys = p.add_subparsers(dest="apikey_command", metavar="ACTION", required=True)
    q = keys.add_parser("create", help=cmd_apikey_create.__doc__, description=cmd_apikey_create.__doc__)
    q.add_argument("name", help="the channel the key is for, e.g. mobile-app")
    q.add_argument("--per-minute", type=int, default=DEFAULT_PER_MINUTE, metavar="N",
                   help=f"requests this key may make per minute (default: {DEFAULT_PER_MINUTE})")
    q.add_argument("--test", action="store_true",
                   help="a key for monitoring probes and automated tests: its answers are marked test, hidden from "
                        "the review queue and never trained on")
    q.set_defaults(handler=cmd_apikey_create)
    q = keys.add_parser("list", help=cmd_apikey_list.__doc__, description=cmd_apikey_list.__doc__)
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(handler=cmd_apikey_list)
    q = keys.add_parser("revoke", help=cmd_apikey_revoke.__doc__, description=cmd_apikey_revoke.__doc__)
    q.add_argument("name", help="the key's name")
    q.set_defaults(handler=cmd_apikey_revoke)
