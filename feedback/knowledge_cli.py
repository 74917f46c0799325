"""``tuneloop knowledge ...``: the approved question/answer pairs answers are grounded on."""

from __future__ import annotations

import argparse
import json
import sys

from feedback import knowledge
from feedback.db import connect


def cmd_knowledge_add(args) -> int:
    """Add an approved question and answer to the knowledge index; the next question can use it."""
    try:
        entry_id = knowledge.add(connect(), args.question, args.answer, args.label)
    except knowledge.KnowledgeError as exc:
        print(f"tuneloop knowledge add: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"id": entry_id}) if args.json else f"knowledge entry {entry_id} added")
    return 0


def cmd_knowledge_list(args) -> int:
    """List the entries of the knowledge index (dataset rows, staff answers, catalog facts, added pairs)."""
    rows = knowledge.entries(connect(), include_removed=args.removed)
    if args.source:
        rows = [row for row in rows if row["source"] == args.source]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            gone = f"\tremoved {row['removed_at'][:19]}" if row["removed_at"] else ""
            print(f"{row['id']}\t{row['source']}\t{row['question']}\t{row['answer'][:80]}{gone}")
    return 0


def cmd_knowledge_remove(args) -> int:
    """Take an entry out of the knowledge index; the next question no longer sees it."""
    try:
        entry = knowledge.remove(connect(), args.id)
    except knowledge.KnowledgeError as exc:
        print(f"tuneloop knowledge remove: {exc}", file=sys.stderr)
        return 2
    print(f"knowledge entry {entry['id']} removed ({entry['source']}: {entry['question']})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knowledge", help="the approved question/answer pairs answers are grounded on",
                       description="The approved question/answer pairs answers are grounded on.")
    knowledge_sub = p.add_subparsers(dest="knowledge_command", metavar="ACTION", required=True)
    q = knowledge_sub.add_parser("add", help=cmd_knowledge_add.__doc__, description=cmd_knowledge_add.__doc__)
    q.add_argument("--question", required=True, help="the question, as a customer would ask it")
    q.add_argument("--answer", required=True, help="the approved answer")
    q.add_argument("--label", help="product or intent label (optional)")
    q.add_argument("--json", action="store_true", help="print the new entry's id as JSON")
    q.set_defaults(handler=cmd_knowledge_add)
    q = knowledge_sub.add_parser("list", help=cmd_knowledge_list.__doc__, description=cmd_knowledge_list.__doc__)
    q.add_argument("--source", choices=knowledge.SOURCES, help="only entries from this source")
    q.add_argument("--removed", action="store_true", help="include removed entries")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(handler=cmd_knowledge_list)
    q = knowledge_sub.add_parser("remove", help=cmd_knowledge_remove.__doc__, description=cmd_knowledge_remove.__doc__)
    q.add_argument("id", type=int, help="the entry's id (see `tuneloop knowledge list`)")
    q.set_defaults(handler=cmd_knowledge_remove)
