"""``tuneloop privacy erase`` and ``tuneloop privacy expire``: a customer's right to erasure and the
retention of chat turns (:mod:`feedback.privacy` does the work), and the ``tuneloop status`` line
that names adapters trained on text erased since."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

WAL_WARNING = ("a reader kept feedback.db-wal from being emptied; the rows are deleted, but a copy may stay in the "
               "WAL until SQLite's next checkpoint")


def cmd_privacy_erase(args) -> int:
    """Erase a chat session's or one turn's customer text everywhere it is stored, dataset snapshots included."""
    from feedback import privacy
    from feedback.db import connect

    try:
        erasure = privacy.erase(connect(), session_id=args.session, turn_id=args.turn,
                                erased_by=args.by or getpass.getuser())
    except privacy.ErasureError as exc:
        print(f"tuneloop privacy erase: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(erasure.to_json()))
    else:
        print(f"tuneloop: erased {erasure.kind} {erasure.target}: {len(erasure.turn_ids)} turn(s), "
              f"{len(erasure.row_ids) - len(erasure.turn_ids)} staff correction(s) or approval(s), "
              f"snapshots rewritten: {', '.join(erasure.snapshots) or 'none'} (erasure {erasure.id})")
    if not erasure.wal_cleared:
        print(f"tuneloop privacy erase: {WAL_WARNING}", file=sys.stderr)
        return 1
    return 0


def cmd_privacy_expire(args) -> int:
    """Erase chat turns older than [privacy] keep_days that no staff member corrected or approved (the nightly job does this too)."""
    from feedback import privacy
    from feedback.db import connect

    keep_days = privacy.load_config().keep_days if args.keep_days is None else args.keep_days
    if keep_days < 0:
        print("tuneloop privacy expire: --keep-days must be 0 (keep turns forever) or a number of days", file=sys.stderr)
        return 2
    expired = privacy.expire(connect(), keep_days)
    if args.json:
        print(json.dumps({"keep_days": keep_days, "expired_turns": expired}))
    elif keep_days == 0:
        print("tuneloop: [privacy] keep_days is 0: turns are kept forever, none expired")
    else:
        print(f"tuneloop: {expired} turn(s) older than {keep_days} day(s) erased")
    return 0


def status_fields() -> dict:
    """``{"adapters_with_erased_rows": [versions]}`` for ``tuneloop status``."""
    from feedback import privacy
    from feedback.db import connect

    return {"adapters_with_erased_rows": privacy.adapters_with_erased_rows(connect())}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("privacy", help="erase a customer's chat text; expire old turns",
                       description="Erase a customer's chat text; expire old turns ([privacy] keep_days).")
    actions = p.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    q = actions.add_parser("erase", help=cmd_privacy_erase.__doc__, description=cmd_privacy_erase.__doc__)
    target = q.add_mutually_exclusive_group(required=True)
    target.add_argument("--session", metavar="ID", help="the chat session to erase (every turn of it)")
    target.add_argument("--turn", type=int, metavar="ID", help="the one turn to erase")
    q.add_argument("--by", metavar="NAME", help="who asked for the erasure, for its record (default: your login name)")
    q.add_argument("--json", action="store_true", help="print the erasure record (ids only) as JSON")
    q.set_defaults(handler=cmd_privacy_erase)
    q = actions.add_parser("expire", help=cmd_privacy_expire.__doc__, description=cmd_privacy_expire.__doc__)
    q.add_argument("--keep-days", type=int, metavar="N", help="override [privacy] keep_days for this run")
    q.add_argument("--json", action="store_true", help="print keep_days and expired_turns as JSON")
    q.set_defaults(handler=cmd_privacy_expire)
