"""The ``tuneloop`` command: one console command with subcommands (like ``llm`` or ``litgpt``).

Each package adds its own subcommands through an ``add_commands(subparsers)`` function in its
``cli`` module; heavy libraries are imported inside the handlers so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from importlib import metadata

from assistant import paths
from assistant.config import (ANSWER_FIELDS, DEFAULT_SYSTEM_PROMPT, ConfigError, ServeConfig, add_arguments, as_dict,
                              from_args, plain_text)
from assistant.progress import StageProgress

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
    fail = ((lambda text: print(text, file=sys.stderr, flush=True)) if cfg.log_format == "text"
            else logging.getLogger("tuneloop").error)
    privacy.load_config()  # a bad [privacy] table stops the start, not every answer
    db = ThreadLocalDB()
    # No model yet: the port opens first (/healthz 200, /readyz 503 "starting", a question is asked to
    # come back in a moment) and the model loads behind it. Every backend keeps the base model id it
    # was given (assistant.model.prepare), so the turns log cfg.base_model as before.
    service = ChatService(cfg, None, references=KnowledgeIndex(db.get))
    demo = app.build_app(service, db, cfg.base_model, title=cfg.title)
    # Handlers before the port opens: a SIGTERM right after /readyz first says 200 must drain, not kill.
    stop = threading.Event()

    def on_stop(*_):
        service.draining = True  # /readyz 503 and new questions refused at once, even mid-start
        stop.set()

    def close() -> None:
        import contextlib
        import io

        # Gradio prints a plain "Closing server" line per server on close, which would break a JSON
        # log's one object per line; our own "stopped" line (or error line) says it for both formats.
        with contextlib.redirect_stdout(io.StringIO()):
            app.close(demo)
        db.get().conn.close()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_stop)
    try:
        # Checks every address first: a taken port is said before anything listens or loads.
        app.launch(demo, cfg.host, cfg.port, cfg.concurrency, block=False)
    except app.AddressInUse as exc:
        fail(f"tuneloop: {exc}")
        return 1
    loaded: dict = {}

    def load() -> None:
        try:
            loaded["backend"] = make_backend(cfg)
        except Exception as exc:
            loaded["error"] = exc

    # The model loads on a thread of its own so the main thread stays free for the signal handlers.
    loader = threading.Thread(target=load, name="tuneloop-load-model", daemon=True)
    loader.start()
    while loader.is_alive() and not stop.is_set():
        loader.join(0.2)
    if "backend" not in loaded:
        close()
        if stop.is_set():  # the loader is a daemon thread: it ends with the process
            say("tuneloop: stopped (before the model had loaded)")
            return 0
        exc = loaded["error"]
        detail = (str(exc).strip().splitlines() or [""])[0]
        fail(f"tuneloop: could not load the model {cfg.base_model}: {exc.__class__.__name__}{': ' + detail if detail else ''}")
        return 1
    backend = service.backend = loaded["backend"]
    say(f"tuneloop: serving {cfg.base_model} ({cfg.quantization}, {getattr(backend, 'name', cfg.backend)}) with adapter "
        f"{backend.active or 'none (base model)'} at http://{cfg.host}:{cfg.port}")
    if cfg.staff_port:
        say(f"tuneloop: staff view at http://{cfg.staff_host}:{cfg.staff_port}{app.STAFF_PATH}")
    while not stop.wait(1.0):  # wakes each second to let the signal handler run
        pass
    # Drain: /readyz turns 503 and new questions are refused; answers in flight get drain_s to end.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once
    service.draining = True
    say(f"tuneloop: draining {service.in_flight} answer(s), up to {cfg.drain_s:g} s")
    deadline = time.monotonic() + cfg.drain_s
    drained = service.wait_idle(cfg.drain_s)
    # The answers' last messages must reach their clients before Gradio's queue stops.
    app.wait_delivered(demo, max(1.0, deadline - time.monotonic()))
    cut = turns.mark_interrupted(db.get(), sorted(demo.tuneloop_turns_in_flight))
    close()
    say(f"tuneloop: stopped ({'all answers finished' if drained else f'{cut} answer(s) cut off'})")
    return 0


class CommandError(Exception):
    """A command cannot do what was asked; the message says what to do instead (one line, exit 2)."""


def cmd_ask(args) -> int:
    """Answer one question on the current adapter and log it as a turn."""
    question = sys.stdin.read() if args.question == "-" else args.question
    if not question.strip():  # refused before the model loads, which takes seconds
        raise CommandError("the question is empty: give it in quotes, or '-' to read it from stdin")
    from assistant.chat import ChatService, make_backend
    from feedback import turns
    from feedback.db import ThreadLocalDB
    from feedback.knowledge import KnowledgeIndex

    cfg = from_args(ServeConfig, "serve", args)
    backend = make_backend(cfg)
    local = ThreadLocalDB()  # the index searches on a thread of its own, with its own connection
    service = ChatService(cfg, backend, references=KnowledgeIndex(local.get))
    stream = service.answer(question)  # a ChatError (too long, ...) is reported by main()
    db = local.get()
    turn_id = turns.start_turn(db, turns.new_session(db, "cli"), question.strip(), [], backend.base.model_id)
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


NOT_INITIALISED = ("not initialised: run tuneloop init (it prepares the model, imports a domain pack, installs its "
                   "persona and curates the first dataset)")


def initialised() -> bool:
    """Whether this home has been set up: its feedback database exists (``tuneloop init`` creates it)."""
    return paths.feedback_db().exists()


def status_payload(cfg: ServeConfig) -> dict:
    """What ``tuneloop status --json`` prints; packages add their own keys.

    A home that was never set up is only looked at: opening the database or listing adapters would
    create them, so its status says so instead.
    """
    from assistant import adapters

    import importlib

    payload = {
        "home": str(paths.home()),
        "initialised": initialised(),
        "base_model": cfg.base_model,
        "quantization": cfg.quantization,
        "device": cfg.device,
    }
    if not payload["initialised"]:
        return payload | {"current_adapter": None, "adapters": 0}
    payload |= {"current_adapter": adapters.current_version(), "adapters": len(adapters.list_versions())}
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
        if not payload["initialised"]:
            print(NOT_INITIALISED)
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
    payload = init_home(args)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(init_summary(payload))
    return 0


def init_home(args) -> dict:
    """What ``tuneloop init`` does (``tuneloop demo`` too, on a home not set up yet); idempotent."""
    from assistant import model
    from feedback import curate, knowledge, packs
    from feedback.db import connect

    pack = packs.load_pack(args.pack)
    persona_installed = packs.install_persona(pack)
    cfg = from_args(ServeConfig, "serve", args)
    with StageProgress("tuneloop init", 4) as progress:
        progress.start(f"preparing the model {cfg.base_model}")
        info = model.prepare(cfg.base_model)
        max_new_tokens = packs.install_max_new_tokens(pack, _token_counter(info.path))
        db = connect()
        progress.start(f"importing the {pack.title} pack")
        imported = packs.import_pack(db, pack)
        progress.start("curating the first dataset")
        dataset = curate.main(curate.CurateConfig(), db)
        progress.start("indexing approved answers for retrieval")
        if pack.catalog_file is not None:
            knowledge.add_catalog(db, pack.catalog_file, pack.bank)
        knowledge.sync(db)
    return {
        "home": str(paths.home()),
        "pack": pack.name,
        "base_model": info.model_id,
        "persona_installed": persona_installed,
        "imported": imported.imported,
        "skipped_duplicates": imported.skipped_duplicates,
        "dataset": dataset.version,
        "dataset_unchanged": dataset.unchanged,
        "examples": dataset.counts,
        "pack_title": pack.title,
        "max_new_tokens_installed": max_new_tokens,
    }


def _token_counter(model_path: str):
    """Counts a text's tokens with the base model's own tokenizer: its tokenizer files only, no
    weights, loaded at the first count (none when the config file sets max_new_tokens already)."""
    import functools

    from transformers import AutoTokenizer

    tokenizer = functools.cache(lambda: AutoTokenizer.from_pretrained(model_path))
    return lambda text: len(tokenizer()(text, add_special_tokens=False)["input_ids"])


def init_summary(payload: dict) -> str:
    """The one line ``tuneloop init`` prints about what it set up."""
    counts = ", ".join(f"{k} {v}" for k, v in payload["examples"].items())
    return (f"tuneloop home {payload['home']}: {payload['pack_title']} pack, {payload['imported']} new examples "
            f"({payload['skipped_duplicates']} already there); dataset {payload['dataset']} ({counts})")


def demo_retrain_command(epochs: float) -> list[str]:
    """The background retrain ``tuneloop demo`` starts.

    One epoch by default: the first adapter promotes within the demo's sitting on a laptop CPU; the
    nightly job uses the full [train] recipe. No replay: one epoch stays within the forgetting bar
    without it, and sampling it costs minutes. ``-P`` keeps the working directory off ``sys.path``,
    so a ``cli.py`` or ``tuneloop/`` where the user runs the demo cannot stand in for ours.
    """
    return [sys.executable, "-P", "-m", "tuneloop.cli", "retrain", "--epochs", str(epochs), "--replay", "0"]


def cmd_demo(args) -> int:
    """Set up the home first if it is not (as tuneloop init does), serve the chat at once and run the first retrain in the background; the promoted adapter swaps in live."""
    import subprocess

    from feedback import auth
    from feedback.db import connect

    if not initialised() or from_args(ServeConfig, "serve", args).system_prompt == DEFAULT_SYSTEM_PROMPT:
        # Never a silent demo of the generic persona on an empty home: set up the pack first, saying so.
        print(f"tuneloop demo: {paths.home()} is not set up yet, so running `tuneloop init --pack {args.pack}` first: "
              "it prepares the model, imports the pack's examples, installs its persona and curates the first dataset",
              flush=True)
        print(init_summary(init_home(args)), flush=True)
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
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    parser.add_argument("--version", action="version", version=f"tuneloop {metadata.version('tuneloop')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    add_arguments(p, ServeConfig)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("ask", help=cmd_ask.__doc__, description=cmd_ask.__doc__)
    p.add_argument("question", help="the customer question, or - to read it from stdin")
    p.add_argument("--json", action="store_true",
                   help="print answer, adapter, latency_s, tokens_in, tokens_out and sources (the references used) as JSON")
    # One answer, no history: the chat page's and the web server's settings do not apply.
    add_arguments(p, ServeConfig, only=tuple(name for name in ANSWER_FIELDS if name != "max_history_turns"))
    p.set_defaults(handler=cmd_ask)

    p = sub.add_parser("status", help=cmd_status.__doc__, description=cmd_status.__doc__)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("model", help="manage the base model", description="Manage the base model.")
    model_sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = model_sub.add_parser("prepare", help=cmd_model_prepare.__doc__, description=cmd_model_prepare.__doc__)
    q.add_argument("--json", action="store_true", help="print as JSON")
    add_arguments(q, ServeConfig, only=("base_model",))
    q.set_defaults(handler=cmd_model_prepare)

    packs = sorted(folder.name for folder in paths.packs_dir().iterdir() if (folder / "pack.json").exists())
    p = sub.add_parser("init", help=cmd_init.__doc__, description=cmd_init.__doc__)
    p.add_argument("--pack", default="peach_state_bank", choices=packs, help="the shipped domain pack to import (default: peach_state_bank)")
    p.add_argument("--json", action="store_true", help="print what was set up as JSON")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--pack", default="peach_state_bank", choices=packs,
                   help="the domain pack to set up first when the home is not initialised (default: peach_state_bank)")
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
    tidy_help(parser)
    return parser


EXAMPLES: dict[str, tuple[str, ...]] = {
    "serve": ("tuneloop serve", "tuneloop serve --host 0.0.0.0 --port 8080 --log-format json"),
    "ask": ('tuneloop ask "How do I report a lost card?"', 'echo "What is a lien?" | tuneloop ask - --json'),
    "status": ("tuneloop status", "tuneloop status --json"),
    "model prepare": ("tuneloop model prepare", "tuneloop model prepare --base-model ./my-model --json"),
    "init": ("tuneloop init", "tuneloop init --pack peach_state_bank --json"),
    "demo": ("tuneloop demo", "tuneloop demo --no-retrain --port 8080"),
    "config show": ("tuneloop config show",),
    "staff add": ("tuneloop staff add alice", "printf '%s\\n' \"$PASSWORD\" | tuneloop staff add alice --password-stdin"),
    "staff disable": ("tuneloop staff disable alice",),
    "staff enable": ("tuneloop staff enable alice",),
    "staff remove": ("tuneloop staff remove alice",),
    "staff unlock": ("tuneloop staff unlock alice",),
    "staff passwd": ("tuneloop staff passwd alice", "printf '%s\\n' \"$PASSWORD\" | tuneloop staff passwd alice --password-stdin"),
    "staff list": ("tuneloop staff list", "tuneloop staff list --json"),
    "feedback stats": ("tuneloop feedback stats", "tuneloop feedback stats --json"),
    "feedback export": ("tuneloop feedback export --output corrections.jsonl", "tuneloop feedback export --include-thumbs-up > all.jsonl"),
    "knowledge add": ('tuneloop knowledge add --question "When are you open?" --answer "Weekdays 9 to 5." --json',),
    "knowledge list": ("tuneloop knowledge list", "tuneloop knowledge list --source correction --json"),
    "knowledge remove": ("tuneloop knowledge remove 42",),
    "data import": ("tuneloop data import faq.csv", "tuneloop data import chats.jsonl --question-col q --answer-col a --json"),
    "curate": ("tuneloop curate --dry-run", "tuneloop curate --json"),
    "train": ("tuneloop train", "tuneloop train --method lora --max-steps 50 --json"),
    "eval": ("tuneloop eval", "tuneloop eval --adapter base --limit 50 --json"),
    "adapters list": ("tuneloop adapters list", "tuneloop adapters list --json"),
    "adapters promote": ('tuneloop adapters promote v20260131-020000-ab12 --reason "reviewed by hand"',),
    "adapters rollback": ('tuneloop adapters rollback --reason "answers got worse"',),
    "report": ("tuneloop report", "tuneloop report --json"),
    "retrain": ("tuneloop retrain", "tuneloop retrain --force --max-steps 20 --json"),
    "backup": ("tuneloop backup /srv/backups/tuneloop-2026-01-31",),
    "restore": ("tuneloop restore /srv/backups/tuneloop-2026-01-31",),
    "apikey create": ("tuneloop apikey create mobile-app --per-minute 60", "tuneloop apikey create uptime-probe --test"),
    "apikey list": ("tuneloop apikey list --json",),
    "apikey revoke": ("tuneloop apikey revoke mobile-app",),
    "privacy erase": ("tuneloop privacy erase --session Vq3x9TQ0nR8mYk2pLw7s1A --by alice", "tuneloop privacy erase --turn 345 --json"),
    "privacy expire": ("tuneloop privacy expire", "tuneloop privacy expire --keep-days 30 --json"),
}
"""Examples shown at the end of each command's --help (a command module may set its own epilog instead)."""


def tidy_help(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Make every command's --help plain text: no docstring markup, descriptions wrapped here, and the
    command's examples at the end, printed line for line."""
    width = min(shutil.get_terminal_size().columns - 2, 100)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines
    if parser.description:
        paragraphs = plain_text(inspect.cleandoc(parser.description)).split("\n\n")
        parser.description = "\n\n".join(textwrap.fill(" ".join(text.split()), width) for text in paragraphs)
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = plain_text(action.help)
    for action in subcommands:
        for choice in action._choices_actions:  # the one-line summaries in the parent's command list
            choice.help = plain_text(choice.help) if choice.help else choice.help
        for name, child in action.choices.items():
            tidy_help(child, path + (name,))
    if not subcommands:
        parser.set_defaults(command_prog=parser.prog)  # how main() names the command in an error line
        if parser.epilog is None and " ".join(path) in EXAMPLES:
            parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[" ".join(path)])


OUR_PACKAGES = ("assistant", "feedback", "trainer", "evals", "tuneloop", "app")
"""Exceptions of types defined here are expected: raised on purpose, with a message that says what to change."""


def expected(exc: Exception) -> bool:
    """Whether ``exc`` is one of our own errors (exit 2), not a bug or a failure around us (exit 1)."""
    return type(exc).__module__.partition(".")[0] in OUR_PACKAGES


def error_line(exc: Exception, prog: str) -> str:
    """The one line on stderr for a command that failed with ``exc``."""
    message = " ".join(str(exc).split())  # one line, whatever the exception's text
    if isinstance(exc, ConfigError):
        return f"{prog}: configuration error: {message}"
    if expected(exc):
        return f"{prog}: {message}"
    return f"tuneloop: error: {type(exc).__name__}: {message} (run with --debug for the traceback)"


# Options whose value is an id that may begin with "-" (a session id is URL-safe base64): argparse would
# read "--session -x2f..." as two options, so the value is joined to its option before parsing.
ID_OPTIONS = ("--session",)


def join_id_values(argv: list[str]) -> list[str]:
    """``argv`` with ``--session VALUE`` written as ``--session=VALUE``, whatever VALUE begins with."""
    joined, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg in ID_OPTIONS else None
        joined.append(arg if value is None else f"{arg}={value}")
    return joined


def main(argv: list[str] | None = None) -> int:
    """Run one command: its errors are one line on stderr and exit 2 when expected (a config value, an
    unknown user, an empty question), 1 otherwise; the traceback only with --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        paths.configure_environment()
        args = build_parser().parse_args(join_id_values(argv))
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Read from argv too: the home or a command module can fail before the arguments are parsed.
        if args.debug if args is not None else "--debug" in argv:
            raise
        print(error_line(exc, getattr(args, "command_prog", "tuneloop")), file=sys.stderr)
        return 2 if expected(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
