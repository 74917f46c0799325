"""``tuneloop staff ...`` and ``tuneloop feedback ...``: staff users, feedback counts, export."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import warnings
from pathlib import Path

from feedback import auth, store
from feedback.db import connect


def cmd_staff_add(args) -> int:
    """Create a staff user (or reset their password); the password is read from stdin or a prompt."""
    password = _read_password("add", args)
    if password is None:
        return 2
    try:
        name = auth.add_staff(connect(), args.name, password)
    except auth.AuthError as exc:
        print(f"tuneloop staff add: {exc}", file=sys.stderr)
        return 2
    print(f"staff user {name} saved")
    return 0


def cmd_staff_disable(args) -> int:
    """Disable a staff user and sign them out everywhere at once (`staff add` re-enables them)."""
    try:
        ended = auth.disable_staff(connect(), args.name)
    except auth.AuthError as exc:
        print(f"tuneloop staff disable: {exc}", file=sys.stderr)
        return 2
    print(f"staff user {args.name} disabled; {ended} session(s) ended")
    return 0


def cmd_staff_enable(args) -> int:
    """Enable a disabled staff user again; their old password works again."""
    return _staff_action("enable", lambda db: f"staff user {auth.enable_staff(db, args.name)} enabled")


def cmd_staff_remove(args) -> int:
    """Delete a staff user and end their sessions; refused when they wrote corrections (disable them instead)."""
    return _staff_action("remove", lambda db: f"staff user {args.name} removed; {auth.remove_staff(db, args.name)} session(s) ended")


def cmd_staff_unlock(args) -> int:
    """Clear a staff user's sign-in backoff after failed attempts, from every address."""
    return _staff_action("unlock", lambda db: f"staff user {args.name} unlocked; {auth.unlock_staff(db, args.name)} failed sign-in(s) forgiven")


def cmd_staff_passwd(args) -> int:
    """Change an existing staff user's password (from stdin or a prompt) and end all their sessions."""
    password = _read_password("passwd", args)
    if password is None:
        return 2
    return _staff_action("passwd", lambda db: f"password of {args.name} changed; {auth.set_password(db, args.name, password)} session(s) ended")


def _read_password(command: str, args) -> str | None:
    """The password from stdin's first line or typed twice at a prompt; None (said why) when there is none."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print(f"tuneloop staff {command}: no password on stdin; give it as the first line, e.g. "
                  f"printf '%s\\n' \"$PASSWORD\" | tuneloop staff {command} {args.name} --password-stdin", file=sys.stderr)
            return None
        return password
    try:
        # Without a terminal getpass would warn, then read (and echo) stdin; say what to do instead.
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            password = getpass.getpass(f"Password for {args.name}: ")
            repeated = getpass.getpass("Repeat the password: ")
    except (getpass.GetPassWarning, EOFError):
        print(f"tuneloop staff {command}: no terminal to type the password on; pipe it as the first line of stdin "
              f"with --password-stdin", file=sys.stderr)
        return None
    if repeated != password:
        print(f"tuneloop staff {command}: the passwords differ; nothing changed", file=sys.stderr)
        return None
    return password


def _staff_action(command: str, action) -> int:
    try:
        message = action(connect())
    except auth.AuthError as exc:
        print(f"tuneloop staff {command}: {exc}", file=sys.stderr)
        return 2
    print(message)
    return 0


def cmd_staff_list(args) -> int:
    """List staff users (never their password hashes)."""
    users = auth.list_staff(connect())
    if args.json:
        print(json.dumps(users, indent=2))
    else:
        for user in users:
            print(f"{user['name']}\t{'disabled' if user['disabled'] else 'active'}\tsince {user['created_at']}")
    return 0


def cmd_feedback_stats(args) -> int:
    """Count turns, thumbs up and down, corrections and answers waiting for review."""
    counts = store.stats(connect())
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        for key, value in counts.items():
            print(f"{key:>15}: {value}")
    return 0


def cmd_feedback_export(args) -> int:
    """Export staff corrections, approvals and hand-written examples (and, if asked, thumbs-up answers) as chat-messages JSONL."""
    # The served persona is the system message, so training sees exactly what is served; the
    # serve config's loader lives in assistant.config (only this CLI layer reads it).
    from assistant.config import ServeConfig, load

    system_prompt = load(ServeConfig, "serve").system_prompt
    lines = list(store.export_jsonl(connect(), system_prompt, args.include_thumbs_up))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"tuneloop feedback export: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"{len(lines)} examples written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def status_fields() -> dict:
    """``{"feedback": stats}`` for ``tuneloop status``."""
    return {"feedback": store.stats(connect())}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("staff", help="manage staff users of the review view", description="Manage staff users of the review view.")
    staff_sub = p.add_subparsers(dest="staff_command", metavar="ACTION", required=True)
    q = staff_sub.add_parser("add", help=cmd_staff_add.__doc__, description=cmd_staff_add.__doc__)
    q.add_argument("name", help="staff name: letters, digits, '.', '_', '-' (at most 64)")
    q.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin instead of prompting")
    q.set_defaults(handler=cmd_staff_add)
    q = staff_sub.add_parser("disable", help=cmd_staff_disable.__doc__, description=cmd_staff_disable.__doc__)
    q.add_argument("name", help="the staff name to disable")
    q.set_defaults(handler=cmd_staff_disable)
    q = staff_sub.add_parser("enable", help=cmd_staff_enable.__doc__, description=cmd_staff_enable.__doc__)
    q.add_argument("name", help="the staff name to enable")
    q.set_defaults(handler=cmd_staff_enable)
    q = staff_sub.add_parser("remove", help=cmd_staff_remove.__doc__, description=cmd_staff_remove.__doc__)
    q.add_argument("name", help="the staff name to delete")
    q.set_defaults(handler=cmd_staff_remove)
    q = staff_sub.add_parser("unlock", help=cmd_staff_unlock.__doc__, description=cmd_staff_unlock.__doc__)
    q.add_argument("name", help="the staff name whose sign-in backoff to clear")
    q.set_defaults(handler=cmd_staff_unlock)
    q = staff_sub.add_parser("passwd", help=cmd_staff_passwd.__doc__, description=cmd_staff_passwd.__doc__)
    q.add_argument("name", help="an existing staff name")
    q.add_argument("--password-stdin", action="store_true", help="read the new password from the first line of stdin instead of prompting")
    q.set_defaults(handler=cmd_staff_passwd)
    q = staff_sub.add_parser("list", help=cmd_staff_list.__doc__, description=cmd_staff_list.__doc__)
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(handler=cmd_staff_list)

    p = sub.add_parser("feedback", help="customer votes and staff corrections", description="Customer votes and staff corrections.")
    feedback_sub = p.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    q = feedback_sub.add_parser("stats", help=cmd_feedback_stats.__doc__, description=cmd_feedback_stats.__doc__)
    q.add_argument("--json", action="store_true", help="print turns, up, down, corrections, pending_review as JSON")
    q.set_defaults(handler=cmd_feedback_stats)
    q = feedback_sub.add_parser("export", help=cmd_feedback_export.__doc__, description=cmd_feedback_export.__doc__)
    q.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format (chat-messages JSONL)")
    q.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    q.add_argument("--include-thumbs-up", action="store_true",
                   help="also export thumbs-up answers no staff member approved (anyone can vote: off by default)")
    q.set_defaults(handler=cmd_feedback_export)
