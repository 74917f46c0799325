"""``tuneloop data import`` and ``tuneloop curate``, and the ``examples`` counts of ``tuneloop status``."""

from __future__ import annotations

import json
import sys

from assistant import progress
from assistant.config import add_arguments, from_args


def cmd_data_import(args) -> int:
    """Import question/answer examples from a CSV or JSONL file (all rows or none)."""
    from feedback.db import connect
    from feedback.examples import DataImportError, ImportConfig, import_file

    cfg = from_args(ImportConfig, "data", args)
    try:
        with progress.on_stderr():
            result = import_file(connect(), args.file, question_col=args.question_col, answer_col=args.answer_col,
                                 label_col=args.label_col, allow_test=args.into_test, cfg=cfg)
    except DataImportError as exc:
        print(f"tuneloop data import: {exc}", file=sys.stderr)
        return 1
    payload = result.to_json()
    if args.json:
        print(json.dumps(payload))
    else:
        splits = ", ".join(f"{name} {count}" for name, count in payload["splits"].items())
        print(f"imported {payload['imported']} examples ({splits}); skipped {payload['skipped_duplicates']} duplicates"
              + (f"; held out {payload['held_out_near_test']} paraphrases of test questions (use --into-test to add them to test)"
                 if payload["held_out_near_test"] else ""))
    return 0


def cmd_curate(args) -> int:
    """Build the next dataset snapshot from examples and feedback (gold > silver, deduplicated, decontaminated)."""
    from feedback import curate

    cfg = from_args(curate.CurateConfig, "curate", args, extra={"dry_run": True if args.dry_run else None})
    try:
        with progress.on_stderr():
            result = curate.main(cfg)
    except curate.CurateError as exc:
        print(f"tuneloop curate: {exc}", file=sys.stderr)
        return 1
    payload = result.to_json()
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    counts = ", ".join(f"{name} {count}" for name, count in result.counts.items())
    dropped = ", ".join(f"{name} {count}" for name, count in result.dropped.items() if count)
    if result.unchanged:
        print(f"nothing changed since {result.version} ({counts}); no new snapshot written")
    elif result.dry_run:
        print(f"dry run: would write {result.version} ({counts}); dropped: {dropped or 'none'}")
    else:
        print(f"wrote {result.version} at {result.path} ({counts}); dropped: {dropped or 'none'}")
    print(f"training labels: {', '.join(f'{k} {v}' for k, v in result.labels.items())}")
    return 0


def status_fields() -> dict:
    """``{"examples": {"train", "val", "test"}}`` for ``tuneloop status``."""
    from feedback.db import connect
    from feedback.examples import split_counts

    return {"examples": split_counts(connect())}


def add_commands(sub) -> None:
    from feedback.curate import CurateConfig
    from feedback.examples import ImportConfig

    p = sub.add_parser("data", help="manage training examples", description="Manage training examples.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("import", help=cmd_data_import.__doc__, description=cmd_data_import.__doc__ + (
        " Re-importing a file adds nothing. Each new example gets its train/val/test split once; once a test set"
        " exists, imports add to train and val only unless --into-test is given."))
    q.add_argument("file", help="a .csv (with a header row) or .jsonl file (keys, or chat 'messages')")
    q.add_argument("--question-col", default="question", help="column or key of the question (default: question)")
    q.add_argument("--answer-col", default="answer", help="column or key of the answer (default: answer)")
    q.add_argument("--label-col", default=None, help="column or key of the optional label (default: 'label' when present)")
    q.add_argument("--into-test", action="store_true",
                   help="let this import add to the frozen test set (new questions split 80/10/10; paraphrases of test questions join test)")
    q.add_argument("--json", action="store_true", help="print imported, skipped_duplicates, held_out_near_test, splits as JSON")
    add_arguments(q, ImportConfig)
    q.set_defaults(handler=cmd_data_import)

    p = sub.add_parser("curate", help=cmd_curate.__doc__, description=cmd_curate.__doc__)
    p.add_argument("--dry-run", action="store_true", help="report what would be written; write nothing")
    p.add_argument("--json", action="store_true", help="print version, path, counts, dropped (and unchanged, labels, warnings) as JSON")
    add_arguments(p, CurateConfig, skip=("dry_run",))
    p.set_defaults(handler=cmd_curate)

