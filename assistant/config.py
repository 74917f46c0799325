"""Job configs: one dataclass per job, defaults < config file < environment < ``--field value``.

Each job's dataclass lives next to the job; this module holds the serving config and the loader
they all share. The config file is ``$TUNELOOP_HOME/config.toml`` with one table per job
(``[serve]``, ``[train]``, ...). Environment variables are ``TUNELOOP_<JOB>_<FIELD>``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from assistant import paths

T = TypeVar("T")

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_EXAMPLES = 4
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise customer-support assistant. Answer in one to three sentences. "
    "If a question is outside what you can help with, say so politely and suggest contacting staff."
)


BACKENDS = ("auto", "transformers", "llama_cpp", "vllm")
"""What can run the model (``ServeConfig.backend``)."""


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message says what to change."""


@dataclass
class ServeConfig:
    base_model: str = DEFAULT_BASE_MODEL
    """Base model: the default SmolLM2 id (prepared from the bundled GGUF), any HF id, or a local folder."""
    quantization: str = "nf4"
    """Weight quantization of the served base: "nf4" (bitsandbytes 4-bit) or "none"."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    backend: str = "auto"
    """What runs the model: "auto" (llama_cpp on a CPU for a Llama base, else transformers), "transformers" (PyTorch, bitsandbytes 4-bit), "llama_cpp" (llama.cpp on GGUF files, CPU) or "vllm" (GPU hosts, needs pip install vllm)."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The domain persona, sent as the system message of every chat and training example."""
    title: str = "tuneloop assistant"
    """Name shown at the top of the chat page."""
    welcome: str = "Hello! Ask me a question and I will do my best to answer it."
    """First message of the assistant in every new customer chat (a domain pack sets its own)."""
    examples: str = ""
    """Example questions offered in an empty customer chat, separated by '|' (at most 4; empty offers none)."""
    disclaimer: str = "Answers may be wrong; staff review them."
    """One line shown under the customer chat; empty shows none."""
    max_new_tokens: int = 96
    """Longest answer, in tokens."""
    temperature: float = 0.0
    """0 means greedy decoding (reproducible answers, the same as evaluation)."""
    top_p: float = 0.9
    """Nucleus sampling cut-off, used only when temperature > 0."""
    repetition_penalty: float = 1.1
    """Penalty for repeating tokens; small models loop without it."""
    penalize_prompt: bool = False
    """Whether the repetition penalty also counts the prompt's tokens (the persona, the references, the question) or only the answer's; off lets an answer repeat the product names and figures its prompt gives it."""
    max_input_chars: int = 2000
    """Longest customer message accepted; longer ones get a clear refusal."""
    max_history_turns: int = 3
    """Earlier turns of the conversation included in the prompt."""
    retrieval_k: int = 3
    """Approved question/answer pairs put in the prompt when the base model serves (0 = none); an adapter uses what it was trained with."""
    retrieval_min_score: float = 0.4
    """Least cosine similarity between a pair's question and the customer's for the pair to be used (chosen by benchmarks/retrieval_threshold.py)."""
    staff_margin: float = 0.05
    """A staff-approved pair (correction, approval, `tuneloop knowledge add`) scoring within this much of the best reference goes first; 0 keeps plain similarity order (chosen by benchmarks/retrieval_threshold.py)."""
    verbatim: bool = True
    """Answer a question whose best reference is a near-certain match (similarity >= verbatim_min_score) to an approved question with that approved answer itself, without generating."""
    verbatim_min_score: float = 0.9
    """Similarity for a verbatim answer: curation's near-duplicate threshold, at which 9 in 10 question pairs ask the same thing."""
    staff_verbatim_min_score: float = 0.6
    """Similarity from which a staff-approved pair leading the references is given verbatim: there the nearest approved answer is on the asked topic about as often as the best adapter's, and states no invented figure (chosen by benchmarks/retrieval_threshold.py)."""
    concurrency: int = 4
    """Answers generated at once: llama_cpp decodes them together in one batch; transformers on CPU lets them take turns on the model's one thread, on CUDA runs them at once."""
    max_queue: int = 32
    """Answers that may wait for a free slot; past that a customer is asked to try again."""
    host: str = "127.0.0.1"
    """Address the server binds; 127.0.0.1 keeps it off the network."""
    port: int = 7860
    """Port the server listens on."""
    staff_host: str = "127.0.0.1"
    """Address the staff view binds when staff_port is set; 127.0.0.1 keeps it off the network."""
    staff_port: int = 0
    """Port of the staff view and its sign-in; 0 serves them on the chat port, any other port takes them off the chat port (404 there)."""
    staff_session_hours: float = 8.0
    """How long a staff sign-in lasts; then staff sign in again."""
    max_conversation_turns: int = 20
    """Turns of one conversation the server keeps showing; older ones drop off the page."""
    max_history_bytes: int = 32_000
    """Most bytes of earlier conversation kept with a turn and shown back; older turns drop off first."""
    sessions_per_address_per_minute: int = 120
    """New conversations one client address may start per minute; past that it is asked to wait."""
    votes_per_address_per_minute: int = 30
    """Votes that count per client address per minute, over all its conversations; more are kept but flagged."""
    votes_per_minute: int = 600
    """Votes that count per minute for the whole server; more are kept but flagged."""
    signin_hashes_per_minute: int = 60
    """Password checks per minute for all sign-ins together; past that sign-in asks to wait."""
    signin_hashes_per_address_per_minute: int = 10
    """Password checks per minute for one client address."""
    max_browser_sessions: int = 2000
    """Browser sessions whose page state the server keeps in memory; the oldest is dropped first."""
    metrics_token: str = ""
    """Bearer token a scraper of /metrics must send; empty means /metrics answers only clients on this machine that did not come through a proxy."""
    drain_s: float = 30.0
    """On SIGTERM, seconds answers in flight may take to finish before the server stops (new questions are refused meanwhile)."""
    log_format: str = "text"
    """How the server logs: "text" for people, "json" for one JSON object per line (event, turn id, adapter, latency; never customer text)."""

    def __post_init__(self) -> None:
        check(self.log_format in ("text", "json"), f"log_format must be 'text' or 'json', not {self.log_format!r}")
        check(self.quantization in ("nf4", "none"), f"quantization must be 'nf4' or 'none', not {self.quantization!r}")
        check(self.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        check(self.backend in BACKENDS, f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {self.backend!r}")
        check(not (self.backend == "vllm" and self.device == "cpu"), "backend 'vllm' runs on a CUDA GPU; on a CPU use 'llama_cpp'")
        check(1 <= self.max_new_tokens <= 4096, "max_new_tokens must be between 1 and 4096")
        check(0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2")
        check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        check(1.0 <= self.repetition_penalty <= 2.0, "repetition_penalty must be between 1.0 and 2.0")
        check(1 <= self.max_input_chars <= 100_000, "max_input_chars must be between 1 and 100000")
        check(0 <= self.max_history_turns <= 50, "max_history_turns must be between 0 and 50")
        check(0 <= self.retrieval_k <= 20, "retrieval_k must be between 0 (no references) and 20")
        check(0.0 <= self.retrieval_min_score <= 1.0, "retrieval_min_score must be between 0 and 1")
        check(0.0 <= self.staff_margin <= 1.0, "staff_margin must be between 0 (plain similarity order) and 1")
        check(0.4 <= self.staff_verbatim_min_score <= 1.0, "staff_verbatim_min_score must be between 0.4 and 1 (set verbatim = false to turn verbatim answers off)")
        check(0.5 <= self.verbatim_min_score <= 1.0, "verbatim_min_score must be between 0.5 and 1 (set verbatim = false to turn it off)")
        check(1 <= self.concurrency <= 64, "concurrency must be between 1 and 64")
        check(0 <= self.max_queue <= 1000, "max_queue must be between 0 and 1000")
        check(0 < self.port < 65536, "port must be between 1 and 65535")
        check(0 <= self.staff_port < 65536, "staff_port must be between 1 and 65535, or 0 to serve staff on the chat port")
        check(self.staff_port != self.port, "staff_port must differ from port (0 serves staff on the chat port)")
        check(0 < self.staff_session_hours <= 24 * 30, "staff_session_hours must be between 0 and 720")
        check(1 <= self.max_conversation_turns <= 1000, "max_conversation_turns must be between 1 and 1000")
        check(1_000 <= self.max_history_bytes <= 10_000_000, "max_history_bytes must be between 1000 and 10000000")
        for name in ("sessions_per_address_per_minute", "votes_per_address_per_minute", "votes_per_minute",
                     "signin_hashes_per_minute", "signin_hashes_per_address_per_minute", "max_browser_sessions"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1")
        check(bool(self.system_prompt.strip()), "system_prompt must not be empty")
        check(len(self.example_questions()) <= MAX_EXAMPLES, f"examples: at most {MAX_EXAMPLES} questions, separated by '|'")
        check(0 <= self.drain_s <= 3600, "drain_s must be between 0 and 3600 seconds")

    def example_questions(self) -> list[str]:
        """The example questions of ``examples``, in order, blanks dropped."""
        return [question.strip() for question in self.examples.split("|") if question.strip()]


class Switch(str):
    """The type of an "auto" / "on" / "off" setting: a config file may also write true or false, and
    the dataclass's ``__post_init__`` normalises (see ``trainer.config``); the command line takes a value."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load(cls: type[T], section: str, overrides: dict[str, Any] | None = None, file: Path | None = None) -> T:
    """Build ``cls`` from defaults, the ``[section]`` table of the config file, env and overrides.

    ``overrides`` holds CLI values; ``None`` values mean "not given" and are skipped.
    """
    values: dict[str, Any] = {}
    file = file or paths.config_file()
    if file.exists():
        try:
            table = tomllib.loads(file.read_text(encoding="utf-8")).get(section, {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid TOML ({exc}); fix or delete the file") from exc
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: '{section}' must be a table ([{section}] followed by 'name = value' lines)")
        values.update(_known(cls, table, f"{file} [{section}]"))
    for field in dataclasses.fields(cls):
        env = os.environ.get(f"TUNELOOP_{section}_{field.name}".upper())
        if env is not None:
            values[field.name] = env
    values.update(_known(cls, {k: v for k, v in (overrides or {}).items() if v is not None}, "overrides"))
    hints = typing.get_type_hints(cls)
    coerced = {name: coerce(value, hints[name], name) for name, value in values.items()}
    return cls(**coerced)


def _known(cls: type, table: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(table)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a string from the environment or command line into the field's type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = args[0]
    if isinstance(value, str) and hint is not str:
        text = value.strip()
        try:
            if hint is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if hint is int:
                return int(text)
            if hint is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not a valid {hint.__name__}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field, for ``--help`` texts."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = str(following.value.value)
    return docs


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


ANSWER_FIELDS = ("base_model", "quantization", "device", "backend", "system_prompt", "max_new_tokens", "temperature",
                 "top_p", "repetition_penalty", "penalize_prompt", "max_input_chars", "max_history_turns", "retrieval_k",
                 "retrieval_min_score", "staff_margin", "verbatim", "verbatim_min_score",
                 "staff_verbatim_min_score")
"""The ``ServeConfig`` fields that shape an answer; the others set up the web server and the chat page.
Commands that answer without serving (``ask``, ``eval``) offer only these as options."""


def add_arguments(parser, cls: type, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """Add a ``--field value`` option for every field of ``cls`` (help from the field docstrings),
    or only for the fields in ``only``; a bool field becomes a ``--field`` / ``--no-field`` flag."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
        # default=None means "not given", so the config file and environment still count.
        help_text = plain_text(f"{docs.get(field.name, '')} (default: {default!r})").replace("%", "%%")
        if hints[field.name] is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar="VALUE", help=help_text)


_SPHINX_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`(~?)([^`<]+?)(?: <[^`]+>)?`")
_SPHINX_LITERAL = re.compile(r"``(.+?)``")


def plain_text(text: str) -> str:
    """Docstring text as ``--help`` text: Sphinx roles (:func:`x`) and ``literals`` lose their markup."""
    text = _SPHINX_ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return _SPHINX_LITERAL.sub(r"\1", text)


def from_args(cls: type[T], section: str, args, extra: dict[str, Any] | None = None) -> T:
    """The job config from defaults, config file, environment and the parsed ``--field`` options."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load(cls, section, overrides)
