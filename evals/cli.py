"""``tuneloop eval``, ``tuneloop adapters ...`` and ``tuneloop report``.

``tuneloop retrain`` lives in :mod:`tuneloop.pipeline`, the one module allowed to import the trainer too.
"""

from __future__ import annotations

import argparse
import json
import sys

from assistant import adapters, progress
from assistant.config import ANSWER_FIELDS, ServeConfig, add_arguments, from_args, load


def cmd_eval(args) -> int:
    """Score an adapter (or the base model) on a test set in the served configuration."""
    from evals import evaluate, schema

    from feedback.datasets import DatasetError

    cfg = from_args(evaluate.EvalConfig, "eval", args, {"baselines": True if args.baselines else None})
    # What `tuneloop serve` and `tuneloop retrain` resolve too, with this command's serve options on top.
    serve = from_args(ServeConfig, "serve", args)
    try:
        with progress.on_stderr():
            report = evaluate.main(cfg, serve)
    except (DatasetError, adapters.AdapterError) as exc:
        print(f"tuneloop eval: {exc}", file=sys.stderr)
        return 2
    evaluate.record_report(schema.connect(), report, "manual")
    if args.json:
        print(json.dumps(report.to_json(examples=False), indent=2))
    else:
        print(f"adapter {report.adapter or 'base'} on {report.dataset} (n={report.n})")
        for key in ("f1", "label_f1", "knn_label_f1", "unsupported_facts", "answer_f1", "rouge_l", "bleu", "latency_s",
                    "tokens_per_answer", "prompt_tokens"):
            value = getattr(report, key)
            print(f"{key:>18}: {'-' if value is None else round(value, 4)}")
        low, high = report.f1_ci
        print(f"{'f1 95% CI':>18}: {low:.4f} - {high:.4f} (bootstrap over the {report.n} test examples)")
        retrieval = report.retrieval
        print(f"{'references':>18}: " + (f"{retrieval['k']} per prompt, similarity >= {retrieval['min_score']}" if retrieval else "none"))
        for role, base in report.baselines.items():
            print(f"{role + ' f1':>18}: {round(base.f1, 4)} (prompt tokens {base.prompt_tokens:.0f}, "
                  f"latency {base.latency_s:.3f} s)")
    return 0


def adapter_rows() -> list[dict]:
    """Every adapter with its provenance, test F1 as a candidate, gate verdict and review share."""
    from evals import schema
    from feedback import review

    db = schema.connect()
    current = adapters.current_version()
    f1 = {r["adapter"]: r["f1"] for r in db.query("select adapter, f1 from eval_reports where role = 'candidate' order by id")}
    verdict = {r["candidate"]: bool(r["promote"]) for r in db.query("select candidate, promote from gate_decisions order by id")}
    shares = {s["adapter"]: s["helpful_share"] for s in review.helpful_shares(db)}
    rows = []
    for version in adapters.list_versions():
        provenance = adapters.read_provenance(adapters.adapter_path(version))
        rows.append({
            "version": version,
            "current": version == current,
            "created_at": provenance.get("created_at"),
            "method": provenance.get("method"),
            "dataset": (provenance.get("dataset") or {}).get("version"),
            "f1": f1.get(version),
            "gate": None if version not in verdict else ("promoted" if verdict[version] else "rejected"),
            "helpful_share": shares.get(version),
        })
    return rows


def cmd_adapters_list(args) -> int:
    """List adapters, oldest first, with test F1, gate verdict and which one serves."""
    rows = adapter_rows()
    if args.json:
        print(json.dumps({"current": adapters.current_version(), "adapters": rows}, indent=2))
        return 0
    if not rows:
        print("no adapters yet; the base model serves")
    for row in rows:
        f1 = "-" if row["f1"] is None else f"{row['f1']:.3f}"
        print(f"{'*' if row['current'] else ' '} {row['version']}\t{row['method'] or '-'}\t{row['dataset'] or '-'}\t"
              f"F1 {f1}\t{row['gate'] or 'not gated'}")
    return 0


def cmd_adapters_promote(args) -> int:
    """Serve VERSION now (a manual override of the gate); the running server picks it up."""
    from assistant import model

    serve = load(ServeConfig, "serve")
    info = model.prepare(serve.base_model)
    try:
        adapters.validate(adapters.adapter_path(args.version), info.model_id, info.sha256)
        pointer = adapters.set_current(args.version, args.reason or "manual promotion (tuneloop adapters promote)")
    except adapters.AdapterError as exc:
        print(f"tuneloop adapters promote: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(pointer) if args.json else f"now serving {pointer['version']}")
    return 0


def cmd_adapters_rollback(args) -> int:
    """Serve the adapter that served before the current one (possibly the base model)."""
    try:
        pointer = adapters.rollback(args.reason or "manual rollback (tuneloop adapters rollback)")
    except adapters.AdapterError as exc:
        print(f"tuneloop adapters rollback: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(pointer) if args.json else f"now serving {pointer['version'] or 'the base model'}")
    return 0


def cmd_report(args) -> int:
    """Write the HTML report (F1 history, loss curves, confusions, fixed/broken answers, reviews)."""
    from evals import report

    result = report.main(from_args(report.ReportConfig, "report", args))
    print(json.dumps(result, indent=2) if args.json else result["html"])
    return 0


def status_fields() -> dict:
    """``{"last_retrain": ...}`` for ``tuneloop status``."""
    from evals import schema

    db = schema.connect()
    rows = list(db.query("select id, status, stage, started_at, candidate, promoted from retrain_runs order by id desc limit 1"))
    return {"last_retrain": rows[0] if rows else None}


EVAL_SKIPS_SERVE = ("title", "max_input_chars", "max_history_turns", "concurrency", "max_queue", "host", "port", "temperature", "top_p")
"""Serve settings `tuneloop eval` has no use for: evaluation decodes greedily and is not a web server."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    from evals.evaluate import EvalConfig
    from evals.report import ReportConfig

    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    add_arguments(p, EvalConfig, skip=("baselines",))
    # The served configuration to score, e.g. --backend llama_cpp; chat-page and web settings do not apply.
    add_arguments(p, ServeConfig, only=tuple(name for name in ANSWER_FIELDS if name not in EVAL_SKIPS_SERVE))
    p.add_argument("--baselines", action="store_true", help="also evaluate the base model and its few-shot prompt")
    p.add_argument("--json", action="store_true", help="print f1, label_f1, knn_label_f1, unsupported_facts, retrieval, answer_f1, rouge_l, bleu, n, adapter, per_label as JSON")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("adapters", help="list, promote or roll back adapters", description="List, promote or roll back adapters.")
    adapters_sub = p.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    q = adapters_sub.add_parser("list", help=cmd_adapters_list.__doc__, description=cmd_adapters_list.__doc__)
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(handler=cmd_adapters_list)
    q = adapters_sub.add_parser("promote", help=cmd_adapters_promote.__doc__, description=cmd_adapters_promote.__doc__)
    q.add_argument("version", help="the adapter version to serve")
    q.add_argument("--reason", help="why, kept in the pointer's record")
    q.add_argument("--json", action="store_true", help="print the new pointer as JSON")
    q.set_defaults(handler=cmd_adapters_promote)
    q = adapters_sub.add_parser("rollback", help=cmd_adapters_rollback.__doc__, description=cmd_adapters_rollback.__doc__)
    q.add_argument("--reason", help="why, kept in the pointer's record")
    q.add_argument("--json", action="store_true", help="print the new pointer as JSON")
    q.set_defaults(handler=cmd_adapters_rollback)

    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    add_arguments(p, ReportConfig)
    p.add_argument("--json", action="store_true", help="print the paths written as JSON")
    p.set_defaults(handler=cmd_report)
