"""The ``tuneloop`` command: one console command with subcommands (like ``llm`` or ``litgpt``).

Each package adds its own subcommands through an ``add_commands(subparsers)`` function in its
``cli`` module; heavy libraries are imported inside the handlers so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from assistant import paths
from assistant.config import ConfigError, ServeConfig, add_arguments, as_dict, from_args

# Modules with ``add_commands(subparsers)`` (and optionally ``status_fields() -> dict``).
COMMAND_MODULES: list[str] = ["feedback.cli", "trainer.cli", "feedback.data_cli", "feedback.knowledge_cli", "evals.cli",
                              "tuneloop.pipeline", "feedback.backup", "feedback.apikeys", "feedback.privacy_cli"]


def cmd_serve(args) -> int:
    """Serve the customer chat (and staff view) until stopped; SIGTERM or Ctrl-C lets answers in flight finish first ([serve] drain_s)."""
    import app
    from assistant import logs
    from assistant.chat import ChatService, make_backend
    from feedback import privacy, turns
    from feedback.db import ThreadLocalDB
    from feedback.knowledge import KnowledgeIndex

    cfg = from_args(ServeConfig, "serve", args)
    logs.configure(cfg.log_format, args.verbose)
    # The server's own status lines: printed for people, one JSON event each for a log shipper.
    say = (lambda text: print(text, flush=True)) if cfg.log_format == "text" else logging.getLogger("tuneloop").info
    privacy.load_config()  # a bad [privacy] table stops the start, not every answer
    backend = make_backend(cfg)
    db = ThreadLocalDB()
    service = ChatService(cfg, backend, references=KnowledgeIndex(db.get))
    demo = app.build_app(service, db, backend.base.model_id, title=cfg.title)
    # Handlers before the port opens: a SIGTERM right after /readyz first says 200 must drain, not kill.
    stop = threading.Event()

    def on_stop(*_):
        service.draining = True  # /readyz 503 and new questions refused at once, even mid-start
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_stop)
    app.launch(demo, cfg.host, cfg.port, cfg.concurrency, block=False)
    say(f"tuneloop: serving {cfg.base_model} ({cfg.quantization}, {getattr(backend, 'name', cfg.backend)}) with adapter "
        f"{backend.active or 'none (base model)'} at http://{cfg.host}:{cfg.port}")
    while not stop.wait(1.0):  # wakes each second to let the signal handler run
        pass
    # Drain: /readyz turns 503 and new questions are refused; answers in flight get drain_s to end.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once
    service.draining = True
    say(f"tuneloop: draining {service.in_flight} answer(s), up to {cfg.drain_s:g} s")
    drained = service.wait_idle(cfg.drain_s)
    cut = turns.mark_interrupted(db.get(), sorted(demo.tuneloop_turns_in_flight))
    import contextlib
    import io

    # Gradio prints a plain "Closing server" line on close, which would break a JSON log's one object per line.
    with contextlib.redirect_stdout(io.StringIO()) if cfg.log_format == "json" else contextlib.nullcontext():
        demo.close()
    db.get().conn.close()
    say(f"tuneloop: stopped ({'all answers finished' if drained else f'{cut} answer(s) cut off'})")
    return 0


def cmd_ask(args) -> int:
    """Answer one question on the current adapter and log it as a turn."""
    from assistant.chat import ChatError, ChatService, make_backend
    from feedback import turns
    from feedback.db import ThreadLocalDB
    from feedback.knowledge import KnowledgeIndex

    cfg = from_args(ServeConfig, "serve", args)
    backend = make_backend(cfg)
    local = ThreadLocalDB()  # the index searches on a thread of its own, with its own connection
    service = ChatService(cfg, backend, references=KnowledgeIndex(local.get))
    try:
        stream = service.answer(args.question)
    except ChatError as exc:
        print(f"tuneloop ask: {exc}", file=sys.stderr)
        return 2
    db = local.get()
    turn_id = turns.start_turn(db, turns.new_session(db, "cli"), args.question.strip(), [], backend.base.model_id)
    for piece in stream:
        if not args.json:
            print(piece, end="", flush=True)
    turns.finish_turn(db, turn_id, stream.text, stream.stats)
    stats = stream.stats
    if args.json:
        print(json.dumps({
            "answer": stream.text.strip(),
            "adapter": stats.adapter,
            "latency_s": round(stats.latency_s, 3),
            "first_token_s": None if stats.first_token_s is None else round(stats.first_token_s, 3),
            "tokens_in": stats.tokens_in,
            "tokens_out": stats.tokens_out,
            "turn": turn_id,
            "sources": [source.to_json() for source in stats.sources],
        }))
    else:
        print()
    return 0


def status_payload(cfg: ServeConfig) -> dict:
    """What ``tuneloop status --json`` prints; packages add their own keys."""
    from assistant import adapters

    import importlib

    payload = {
        "home": str(paths.home()),
        "base_model": cfg.base_model,
        "quantization": cfg.quantization,
        "device": cfg.device,
        "current_adapter": adapters.current_version(),
        "adapters": len(adapters.list_versions()),
    }
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        # A command module may contribute keys to the status (e.g. feedback counts, examples).
        if hasattr(module, "status_fields"):
            payload.update(module.status_fields())
    return payload


def cmd_status(args) -> int:
    """Show the base model, quantization, the adapter in service and the runtime home."""
    cfg = from_args(ServeConfig, "serve", args)
    payload = status_payload(cfg)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        for key, value in payload.items():
            if key == "current_adapter" and value is None:
                value = "none promoted yet: the base model answers (`tuneloop retrain` trains and gates one)"
            print(f"{key:>16}: {value}")
    return 0


def cmd_model_prepare(args) -> int:
    """Convert the bundled GGUF (or resolve the configured model) once; idempotent."""
    from assistant import model

    cfg = from_args(ServeConfig, "serve", args)
    info = model.prepare(cfg.base_model)
    payload = {"base_model": info.model_id, "path": info.path, "sha256": info.sha256}
    print(json.dumps(payload) if args.json else f"{info.model_id} ready at {info.path} (sha256 {info.sha256[:12]})")
    return 0


def cmd_init(args) -> int:
    """Set up a home: prepare the model, import a domain pack, install its persona, curate the first dataset."""
    from assistant import model
    from feedback import curate, knowledge, packs
    from feedback.db import connect

    pack = packs.load_pack(args.pack)
    persona_installed = packs.install_persona(pack)
    cfg = from_args(ServeConfig, "serve", args)
    info = model.prepare(cfg.base_model)
    db = connect()
    imported = packs.import_pack(db, pack)
    dataset = curate.main(curate.CurateConfig(), db)
    if pack.catalog_file is not None:
        knowledge.add_catalog(db, pack.catalog_file, pack.bank)
    knowledge.sync(db)
    payload = {
        "home": str(paths.home()),
        "pack": pack.name,
        "base_model": info.model_id,
        "persona_installed": persona_installed,
        "imported": imported.imported,
        "skipped_duplicates": imported.skipped_duplicates,
        "dataset": dataset.version,
        "dataset_unchanged": dataset.unchanged,
        "examples": dataset.counts,
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in dataset.counts.items())
        print(f"tuneloop home {payload['home']}: {pack.title} pack, {imported.imported} new examples "
              f"({imported.skipped_duplicates} already there); dataset {dataset.version} ({counts})")
    return 0


def demo_retrain_command(epochs: float) -> list[str]:
    """The background retrain ``tuneloop demo`` starts.

    One epoch by default: the first adapter promotes within the demo's sitting on a laptop CPU; the
    nightly job uses the full [train] recipe. No replay: one epoch stays within the forgetting bar
    without it, and sampling it costs minutes. ``-P`` keeps the working directory off ``sys.path``,
    so a ``cli.py`` or ``tuneloop/`` where the user runs the demo cannot stand in for ours.
    """
    return [sys.executable, "-P", "-m", "tuneloop.cli", "retrain", "--epochs", str(epochs), "--replay", "0"]


def cmd_demo(args) -> int:
    """Serve the chat at once and run the first retrain in the background; the promoted adapter swaps in live."""
    import subprocess

    from feedback import auth
    from feedback.db import connect

    db = connect()
    if not auth.list_staff(db):
        import secrets

        password = secrets.token_urlsafe(9)
        auth.add_staff(db, "staff", password)
        print(f"tuneloop demo: staff sign-in at /staff as 'staff' with password {password} (shown once)", flush=True)
    retrain = None
    if not args.no_retrain:
        # Its own process: training must start from a freshly loaded base (bitsandbytes 4-bit trap)
        # and must never slow the server's event loop.
        retrain = subprocess.Popen(demo_retrain_command(args.retrain_epochs), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"tuneloop demo: first retrain started in the background (pid {retrain.pid}); watch its progress "
              "here and in the staff view", flush=True)
    try:
        return cmd_serve(args)
    finally:
        if retrain is not None and retrain.poll() is None:
            retrain.terminate()


def cmd_config_show(args) -> int:
    """Print the resolved serve config (defaults < config file < environment)."""
    print(json.dumps(as_dict(from_args(ServeConfig, "serve", args)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneloop",
        description="A domain chat assistant that learns from staff corrections: serve, capture feedback, "
        "curate, retrain a LoRA adapter nightly, and promote it only when it measurably improves.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    add_arguments(p, ServeConfig)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("ask", help=cmd_ask.__doc__, description=cmd_ask.__doc__)
    p.add_argument("question", help="the customer question")
    p.add_argument("--json", action="store_true",
                   help="print answer, adapter, latency_s, tokens_in, tokens_out and sources (the references used) as JSON")
    add_arguments(p, ServeConfig, skip=("host", "port", "concurrency"))
    p.set_defaults(handler=cmd_ask)

    p = sub.add_parser("status", help=cmd_status.__doc__, description=cmd_status.__doc__)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("model", help="manage the base model", description="Manage the base model.")
    model_sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = model_sub.add_parser("prepare", help=cmd_model_prepare.__doc__, description=cmd_model_prepare.__doc__)
    q.add_argument("--json", action="store_true", help="print as JSON")
    add_arguments(q, ServeConfig, skip=("host", "port", "concurrency", "system_prompt"))
    q.set_defaults(handler=cmd_model_prepare)

    p = sub.add_parser("init", help=cmd_init.__doc__, description=cmd_init.__doc__)
    p.add_argument("--pack", default="peach_state_bank", help="the shipped domain pack to import (default: peach_state_bank)")
    p.add_argument("--json", action="store_true", help="print what was set up as JSON")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--no-retrain", action="store_true", help="only serve; do not start the background retrain")
    p.add_argument("--retrain-epochs", type=float, default=1.0, metavar="N",
                   help="training epochs of the background retrain (default: 1)")
    add_arguments(p, ServeConfig)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("config", help="show the resolved configuration", description="Show the resolved configuration.")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = config_sub.add_parser("show", help=cmd_config_show.__doc__, description=cmd_config_show.__doc__)
    q.set_defaults(handler=cmd_config_show)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    paths.configure_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"tuneloop: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
