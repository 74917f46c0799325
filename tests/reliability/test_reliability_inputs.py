"""Bad input, fuzzed with hypothesis over every text the product accepts: chat messages, vote
reasons, corrections and examples, staff names and passwords, imported CSV/JSONL rows, config
values and command-line arguments. Huge, empty, control characters, HTML/JS, SQL, prompt
injection. Each must give a clear error or be stored exactly as given (after the documented
strip); nothing may crash. These drive the store functions directly; a handful of the same
inputs go through the live API in test_reliability_access.py, which also checks markup comes back
escaped."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import string
import sys
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from assistant import config as config_module
from assistant.chat import ChatError, ChatService, ScriptedBackend
from assistant.config import ConfigError, ServeConfig
from assistant import embeddings
from feedback import auth, examples, store, turns
from feedback.db import connect
from reliability_harness import (
    BAD_TEXTS,
    STAFF_NAME,
    STAFF_PASSWORD,
    SURROGATE_TEXTS,
    UNCLEAR,
    bad_input_sweep,
    clear_errors,
    entry_points,
)

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
# Hypothesis' text excludes lone surrogates; they get their own deterministic tests below.
TEXT = st.one_of(
    st.sampled_from(sorted(BAD_TEXTS.values())),
    st.text(max_size=120),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=120),
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=12), st.integers(1, 700)),
)


@pytest.fixture
def world(tuneloop_home):
    """A database with a staff user and a customer session holding one finished answer."""
    db = connect()
    auth.add_staff(db, STAFF_NAME, STAFF_PASSWORD)
    session = turns.new_session(db)
    turn_id = _answered_turn(db, session, "How do I freeze my card?")
    return db, session, turn_id


def _answered_turn(db, session: str, question: str) -> int:
    entry_points()["chat"](db, session, None, question)  # what app.respond does: log, answer, finish
    return db.execute("SELECT max(id) FROM turns").fetchone()[0]


def _one(db, sql: str, params) -> tuple:
    return db.execute(sql, params).fetchone()


# --- customer texts ------------------------------------------------------------------------------


@FUZZ
@given(message=TEXT)
def test_chat_message_is_refused_clearly_or_stored_exactly(message, world):
    db, session, _ = world
    try:
        turn_id = _answered_turn(db, session, message)
    except ChatError as exc:
        assert not message.strip() or len(message.strip()) > ServeConfig().max_input_chars, exc
        return
    assert _one(db, "SELECT question, status FROM turns WHERE id = ?", [turn_id]) == (message.strip(), "complete")


# Slow tier: a hypothesis sweep (42 s on 2 cores); the fast tier keeps the chat-message sweep above.
@pytest.mark.slow
@FUZZ
@given(reason=TEXT, value=st.sampled_from(["up", "down", "Down ", 1, -1]))
def test_vote_reason_is_refused_clearly_or_stored_exactly(reason, value, world):
    db, session, turn_id = world
    try:
        vote = store.log_vote(db, session, turn_id, value, reason)
    except store.FeedbackError as exc:
        assert len(reason.strip()) > store.MAX_REASON_CHARS, exc
        return
    down = vote["value"] == store.DOWN
    assert _one(db, "SELECT reason FROM votes WHERE id = ?", [vote["id"]]) == ((reason.strip() or None) if down else None,)


@FUZZ
@given(value=st.one_of(TEXT, st.integers(), st.floats(allow_nan=True), st.none(), st.booleans()),
       # Numbers outside SQLite's 64-bit range: test_out_of_range_answer_numbers_are_refused_clearly.
       turn=st.one_of(TEXT, st.integers(-(2**63), 2**63 - 1), st.none(),
                      st.floats(min_value=-1e18, max_value=1e18), st.just(float("nan"))))
def test_vote_value_and_turn_are_refused_clearly(value, turn, world):
    db, session, turn_id = world
    try:
        store.log_vote(db, session, turn, value)
    except store.FeedbackError:
        return
    assert int(turn) == turn_id  # only the session's own, real answer can be rated


@FUZZ
@given(answer=TEXT, label=st.one_of(st.none(), TEXT))
def test_staff_correction_is_refused_clearly_or_stored_exactly(answer, label, world):
    db, _, turn_id = world
    try:
        row = store.record_correction(db, STAFF_NAME, turn_id, answer, label)
    except store.FeedbackError as exc:
        too_long = len(answer.strip()) > store.MAX_ANSWER_CHARS or len((label or "").strip()) > store.MAX_LABEL_CHARS
        assert not answer.strip() or too_long, exc
        return
    stored = _one(db, "SELECT answer, label, staff_user FROM corrections WHERE id = ?", [row])
    assert stored == (answer.strip(), (label or "").strip() or None, STAFF_NAME)


@FUZZ
@given(question=TEXT, answer=TEXT, staff=st.one_of(st.just(STAFF_NAME), TEXT))
def test_hand_written_example_is_refused_clearly_or_stored_exactly(question, answer, staff, world):
    db, _, _ = world
    try:
        row = store.add_example(db, staff, question, answer)
    except (store.FeedbackError, auth.AuthError):
        return
    assert staff == STAFF_NAME
    assert _one(db, "SELECT question, answer FROM corrections WHERE id = ?", [row]) == (question.strip(), answer.strip())


# --- staff sign-in -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=30)
@given(name=TEXT, password=TEXT)
@example(name="' OR 1=1 --", password="' OR '1'='1")
@example(name=STAFF_NAME + "\x00", password=STAFF_PASSWORD)
@example(name=STAFF_NAME.upper(), password=STAFF_PASSWORD)
def test_sign_in_with_any_other_name_or_password_is_refused(name, password, world):
    db, _, _ = world
    with pytest.raises(auth.AuthError) as refused:
        auth.sign_in(db, name, password)
    assert not any(word in str(refused.value) for word in UNCLEAR)


@settings(FUZZ, max_examples=25)
@given(name=TEXT, password=TEXT)
def test_new_staff_user_is_refused_clearly_or_stored_hashed(name, password, world):
    db, _, _ = world
    try:
        stored_name = auth.add_staff(db, name, password)
    except auth.AuthError:
        return
    assert stored_name == name.strip()
    (hashed,) = _one(db, "SELECT password_hash FROM staff_users WHERE name = ?", [stored_name])
    assert hashed.startswith("$argon2id$") and password not in hashed
    assert auth.sign_in(db, stored_name, password) == stored_name


# --- imports -------------------------------------------------------------------------------------


@pytest.fixture
def no_embedding_model(monkeypatch):
    """Imports embed questions to decide splits; a hash-seeded unit vector stands in for MiniLM."""

    def embed(texts, batch_size=64):
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
            rows.append(vector / np.linalg.norm(vector))
        return np.stack(rows) if rows else np.zeros((0, 384), np.float32)

    monkeypatch.setattr(embeddings, "embed", embed)


FIELD = st.one_of(TEXT, st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(batch=st.lists(st.fixed_dictionaries({"question": FIELD, "answer": FIELD},
                                            optional={"label": FIELD}), min_size=0, max_size=6))
def test_imported_rows_are_refused_clearly_or_stored_exactly(batch, world, no_embedding_model):
    from feedback import dedupe

    db, _, _ = world
    known = {h for (h,) in db.execute("SELECT content_hash FROM examples").fetchall()}
    try:
        examples.import_rows(db, batch, source="import")
    except examples.DataImportError as exc:
        assert exc.errors
        return
    first = {}
    for row in batch:  # the first row of each content hash is the one stored; repeats are duplicates
        stripped = (row["question"].strip(), row["answer"].strip(), (row.get("label") or "").strip() or None)
        first.setdefault(dedupe.content_hash(stripped[0], stripped[1]), stripped)
    for key, expected in first.items():
        stored = db.execute("SELECT question, answer, label FROM examples WHERE content_hash = ?", [key]).fetchall()
        assert len(stored) == 1 and (key in known or stored[0] == expected)


LINES = st.one_of(
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["question", "answer", "label", "messages", "x"]), FIELD, max_size=4)),
    st.builds(lambda q, a: json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}), TEXT, TEXT),
    TEXT.map(lambda t: t.replace("\n", " ")[:300]),
)


@FUZZ
@given(suffix=st.sampled_from([".csv", ".jsonl"]),
       body=st.one_of(st.binary(max_size=600),
                      st.lists(LINES, max_size=5).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
                      st.lists(st.lists(TEXT.map(lambda t: t[:200]), min_size=1, max_size=4), max_size=5).map(
                          lambda table: "\n".join(",".join(json.dumps(c) for c in r) for r in [["question", "answer"], *table]).encode())))
def test_import_files_are_refused_clearly_or_read_as_rows(suffix, body, world, tmp_path):
    file = tmp_path / f"upload{suffix}"
    file.write_bytes(body)
    try:
        rows = examples.read_rows(file)
        clean = examples.validate(rows, examples.ImportConfig())
    except examples.DataImportError as exc:
        assert exc.errors and not any(word in str(exc) for word in ("Traceback", "object has no attribute"))
        return
    assert all(isinstance(r["question"], str) and r["question"] == r["question"].strip() for r in clean)


# --- lone surrogates: valid JSON ("\udc80"), not storable as UTF-8 ----------------------------------

# Lone surrogates (JSON '\\udc80', which the API and JSONL imports accept) cannot be encoded as UTF-8:
# every boundary refuses them with its own clear error instead of a raw UnicodeEncodeError.

@pytest.mark.parametrize("field", sorted(entry_points()))
def test_lone_surrogates_get_a_clear_error(field, world, no_embedding_model):
    db, session, turn_id = world
    for text in SURROGATE_TEXTS.values():
        with pytest.raises(clear_errors()):
            entry_points()[field](db, session, turn_id, text)


# Slow tier: each hostile text at each entry point, the sign-in's argon2 hash included (42 s on 2 cores).
@pytest.mark.slow
def test_every_entry_point_handles_every_hostile_text(world, no_embedding_model):
    tried, handled, failures = bad_input_sweep(*world, BAD_TEXTS)
    assert failures == [] and tried == handled == len(BAD_TEXTS) * len(entry_points())


# --- config values -------------------------------------------------------------------------------


def _job_configs() -> list[tuple[type, str]]:
    from evals.evaluate import EvalConfig
    from evals.gate import GateConfig
    from evals.report import ReportConfig
    from feedback.curate import CurateConfig
    from tuneloop.pipeline import RetrainConfig
    from trainer.config import TrainConfig

    return [(ServeConfig, "serve"), (TrainConfig, "train"), (CurateConfig, "curate"), (examples.ImportConfig, "data"),
            (RetrainConfig, "retrain"), (EvalConfig, "eval"), (GateConfig, "gate"), (ReportConfig, "report")]


VALUE_TEXT = st.one_of(TEXT, st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", " 7 ", "true",
                                              "None", "null", "", "9" * 5000, "1.5", "-1", "2**31"]))


@FUZZ
@given(data=st.data())
def test_config_values_from_flags_or_environment_are_refused_clearly(data, tuneloop_home):
    cls, section = data.draw(st.sampled_from(_job_configs()))
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    value = data.draw(VALUE_TEXT)
    try:
        cfg = config_module.load(cls, section, {field: value})
    except ConfigError as exc:
        assert str(exc)
        return
    hint = typing.get_type_hints(cls)[field]
    assert isinstance(getattr(cfg, field), typing.get_args(hint) or hint) or getattr(cfg, field) is None


TOML_VALUE = st.one_of(st.integers(-10**20, 10**20), st.floats(), st.booleans(), TEXT.map(lambda t: t[:200]),
                       st.lists(st.integers(), max_size=3))


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, or a file TOML refuses (then ConfigError)
    return json.dumps(value)


@FUZZ
@given(table=st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(ServeConfig)] + ["prot", "x y"]),
                             TOML_VALUE, max_size=4),
       raw=st.one_of(st.none(), TEXT))
def test_config_file_is_refused_clearly_or_loaded(table, raw, tuneloop_home):
    from assistant import paths

    text = raw if raw is not None else "[serve]\n" + "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in table.items())
    paths.config_file().write_text(text, encoding="utf-8")
    try:
        cfg = config_module.load(ServeConfig, "serve")
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, ServeConfig)


@pytest.mark.parametrize("text", ["serve = 1", "serve = [1, 2]"])
def test_config_section_that_is_not_a_table_is_refused_clearly(text, tuneloop_home):
    from assistant import paths

    paths.config_file().write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError):
        config_module.load(ServeConfig, "serve")


# --- the command line ----------------------------------------------------------------------------


class ReachedHeavyWork(Exception):
    """The arguments were accepted and the command went on to load a model, train or serve."""


@pytest.fixture
def cli_sandbox(tuneloop_home, tmp_path, monkeypatch):
    """The CLI with model loading, training, evaluation and serving stubbed, stdin fed, and stdout
    (strict UTF-8) and stderr (backslashreplace) as Python sets them up in a UTF-8 terminal."""
    import assistant.chat
    import assistant.model
    import evals.evaluate
    import evals.report
    from tuneloop import pipeline
    import trainer.train

    def heavy(*args, **kwargs):
        raise ReachedHeavyWork

    for module, name in [(assistant.chat, "TransformersBackend"), (assistant.model, "prepare"), (pipeline, "main"),
                         (trainer.train, "main"), (evals.evaluate, "main"), (evals.report, "main")]:
        monkeypatch.setattr(module, name, heavy)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "a long enough password")
    monkeypatch.chdir(tmp_path)

    def streams():
        monkeypatch.setattr(sys, "stdin", io.StringIO("a long enough password\n"))
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict"))
        monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace"))

    return streams


def _commands() -> list[tuple[list[str], list[str]]]:
    """Every (subcommand path, its option flags) of the real parser."""
    import argparse

    from tuneloop import cli

    found = []

    def walk(parser, path):
        flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((path, flags))
        for action in subs:
            for name, child in action.choices.items():
                walk(child, path + [name])

    walk(cli.build_parser(), [])
    return found


ARG = st.one_of(TEXT.filter(lambda t: "\x00" not in t).map(lambda t: t[:300]),
                st.sampled_from(["-1", "0", "nan", "1e9", "--", "-", "../../etc/passwd", "/", "x.csv", "y.jsonl"]),
                st.text(alphabet=string.ascii_letters + "\udcff\udc80", max_size=8))  # undecodable argv bytes


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_any_command_line_exits_with_a_code_never_a_traceback(data, cli_sandbox):
    from tuneloop import cli

    path, flags = data.draw(st.sampled_from(_commands()))
    argv = list(path)
    for _ in range(data.draw(st.integers(0, 4))):
        flag = data.draw(st.one_of(st.sampled_from(flags or ["--nope"]), ARG))
        argv.append(flag)
        if flag == "--output":  # unwritable outputs have their own test below
            argv.append("export.jsonl")
        elif flag.startswith("--") and data.draw(st.booleans()):
            argv.append(data.draw(ARG))
    if data.draw(st.booleans()):
        argv = data.draw(st.permutations(argv))
    cli_sandbox()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    except ReachedHeavyWork:
        return
    assert isinstance(code, int) or code is None


@pytest.mark.parametrize("output", [".", "/proc/no-such-dir/export.jsonl"])
def test_export_to_an_unwritable_output_exits_with_a_code(output, cli_sandbox):
    from tuneloop import cli

    cli_sandbox()
    assert cli.main(["feedback", "export", "--output", output]) != 0


# --- prompt injection ----------------------------------------------------------------------------


def test_a_customer_cannot_forge_a_system_turn(tiny_model_dir):
    from assistant.chat import TransformersBackend

    cfg = ServeConfig(base_model=str(tiny_model_dir), device="cpu", max_new_tokens=2)
    backend = TransformersBackend(cfg)
    encoded = []
    real_encode = backend._encode
    backend._encode = lambda messages: encoded.append(real_encode(messages)) or encoded[-1]  # what the model is fed
    "".join(ChatService(cfg, backend).answer(BAD_TEXTS["template"]))
    ids = encoded[-1]["input_ids"][0].tolist()
    # Exactly the template's own turns: the persona, the customer, and the answer being written.
    assert ids.count(backend.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_injection_text_stays_a_customer_message(world):
    db, session, _ = world
    backend = ScriptedBackend()
    service = ChatService(ServeConfig(), backend)
    for text in (BAD_TEXTS["injection"], BAD_TEXTS["json"], BAD_TEXTS["sql"]):
        "".join(service.answer(text))
        system, question = backend.calls[-1]
        assert system == {"role": "system", "content": ServeConfig().system_prompt}
        assert question == {"role": "user", "content": text.strip()}
    assert db["turns"].count == 1 and db["staff_users"].count == 1  # the SQL text ran nowhere
