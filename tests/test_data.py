"""Importing examples: validation with row numbers, all-or-nothing, idempotence, stable and
paraphrase-safe splits, and the frozen test set."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from assistant import embeddings
from feedback import dedupe
from feedback.db import connect
from feedback.examples import DataImportError, ImportConfig, import_file, import_rows, split_counts

QUESTIONS = [
    "How do I reset my online banking password?",
    "What is the interest rate on a savings account?",
    "Can I order a new debit card?",
    "Where is the nearest branch to me?",
    "How long does a wire transfer take?",
    "Why was I charged an overdraft fee?",
    "How can I dispute a credit card charge?",
    "Do you offer student checking accounts?",
    "What documents do I need to open an account?",
    "How do I set up direct deposit?",
    "Is there a fee for using another bank's ATM?",
    "How do I close my account?",
    "Can I get a mortgage preapproval online?",
    "What are your phone support hours?",
    "How do I report a stolen card?",
    "Can I deposit a check with my phone?",
    "How do I add a joint owner to my account?",
    "What is the daily ATM withdrawal limit?",
    "How do I change my mailing address?",
    "Do you have a mobile app for Android?",
    "How can I increase my credit limit?",
    "When will my paycheck deposit be available?",
    "How do I stop a payment on a check?",
    "Are my deposits insured by the FDIC?",
    "Can I travel abroad with my debit card?",
    "How do I enroll in paperless statements?",
    "What is the minimum balance for a money market account?",
    "How do I send money with Zelle?",
    "Can I refinance my car loan with you?",
    "What should I do if I forgot my username?",
    "How do I order checks?",
    "Can I open a certificate of deposit online?",
    "How do I turn on two-factor authentication?",
    "What happens if I miss a loan payment?",
    "Can I change the due date of my credit card bill?",
    "How do I find my routing number?",
    "Do you charge a monthly maintenance fee?",
    "How can I get a copy of an old statement?",
    "Is my personal information safe with you?",
    "Can a minor have a savings account?",
]


def rows_for(questions, label=None):
    return [{"question": q, "answer": f"Answer: {q.lower()}", "label": label} for q in questions]


@pytest.fixture(scope="session", autouse=True)
def embedder():
    """Load MiniLM once for the whole test session (about 5 s)."""
    return embeddings.load_embedder()


@pytest.fixture
def db():
    return connect()


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_errors_name_rows_and_nothing_is_written(tmp_path, db):
    long_question = "x" * 2001
    path = write_csv(tmp_path / "bad.csv", [
        "question,answer,label",
        "How do I reset my password?,Use the reset link.,account",
        "Where is my branch?,,branches",
        f"{long_question},Fine.,x",
        "What are your hours?,9 to 5.,hours",
    ])
    with pytest.raises(DataImportError) as info:
        import_file(db, path)
    message = str(info.value)
    assert "row 2 (line 3): empty answer" in message
    assert "row 3 (line 4): question has 2001 characters" in message
    assert "nothing was imported" in message
    assert db["examples"].count == 0
    assert db["embeddings"].count == 0  # refused before anything was embedded


def test_missing_column_and_unknown_type_are_refused(tmp_path, db):
    path = write_csv(tmp_path / "cols.csv", ["instruction,response", "a question?,an answer."])
    with pytest.raises(DataImportError, match="missing column.*'question'.*--question-col"):
        import_file(db, path)
    result = import_file(db, path, question_col="instruction", answer_col="response")
    assert result.imported == 1
    with pytest.raises(DataImportError, match="unsupported file type"):
        import_file(db, write_csv(tmp_path / "x.txt", ["hi"]))


def test_bad_encoding_is_refused_with_its_line(tmp_path, db):
    path = tmp_path / "latin1.csv"
    path.write_bytes("question,answer\nok?,fine\nCaf\xe9 hours?,9 to 5\n".encode("latin-1"))
    with pytest.raises(DataImportError, match=r"line 3 .*invalid UTF-8"):
        import_file(db, path)
    assert db["examples"].count == 0


def test_jsonl_plain_and_chat_messages(tmp_path, db):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": QUESTIONS[0], "answer": "Use the reset link.", "label": "account"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": QUESTIONS[1]},
                                 {"role": "assistant", "content": "It is 4.1% APY."}]}),
    ]) + "\n", encoding="utf-8")
    result = import_file(db, path)
    assert (result.imported, result.skipped_duplicates) == (2, 0)
    stored = {r["question"]: r for r in db["examples"].rows}
    assert stored[QUESTIONS[1]]["answer"] == "It is 4.1% APY." and stored[QUESTIONS[1]]["label"] is None
    assert stored[QUESTIONS[0]]["label"] == "account"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n"
                   + "{not json\n", encoding="utf-8")
    with pytest.raises(DataImportError) as info:
        import_file(db, bad)
    assert "line 2: 'messages' must hold one user message" in str(info.value)
    assert "line 3: not valid JSON" in str(info.value)
    assert db["examples"].count == 2


def test_reimport_adds_nothing(tmp_path, db):
    path = tmp_path / "faq.csv"
    lines = ["question,answer"] + [f'"{q}","Answer {i}."' for i, q in enumerate(QUESTIONS[:10])]
    write_csv(path, lines)
    first = import_file(db, path)
    assert (first.imported, first.skipped_duplicates) == (10, 0)
    second = import_file(db, path)
    assert (second.imported, second.skipped_duplicates) == (0, 10)
    # Case and spacing do not make a new example: the content hash is of the normalised text.
    third = import_rows(db, [{"question": "  " + QUESTIONS[0].upper(), "answer": "answer   0."}])
    assert (third.imported, third.skipped_duplicates) == (0, 1)
    assert db["examples"].count == 10


def test_split_is_stable_across_databases_and_runs(tmp_path):
    rows = rows_for(QUESTIONS)
    db_a, db_b = connect(tmp_path / "a.db"), connect(tmp_path / "b.db")
    import_rows(db_a, rows)
    import_rows(db_b, list(reversed(rows)))
    split_a = {r["content_hash"]: r["split"] for r in db_a["examples"].rows}
    split_b = {r["content_hash"]: r["split"] for r in db_b["examples"].rows}
    assert split_a == split_b
    assert set(split_a.values()) == {"train", "val", "test"}
    # Later imports never move an example.
    import_rows(db_a, rows_for(["How do I open a business account?", "Can I pay my mortgage by phone?"]))
    assert {r["content_hash"]: r["split"] for r in db_a["examples"].rows if r["content_hash"] in split_a} == split_a


def test_paraphrase_clusters_never_straddle_train_and_test(db):
    # Groups of near-duplicates (numbers are fillers; case and spacing are not meaning).
    groups = [[f"Cancel order {n}" for n in (1111, 2222, 3333)],
              [f"what is the status of invoice #{n}?" for n in (58, 91, 77)],
              ["How do I close my account?", "how do i close my account", "HOW DO I CLOSE MY ACCOUNT ?"]]
    rows = rows_for(QUESTIONS[:30]) + [{"question": q, "answer": f"About {q}."} for g in groups for q in g]
    import_rows(db, rows)
    split_of = {r["question"]: r["split"] for r in db["examples"].rows}
    for group in groups:
        assert len({split_of[q] for q in group}) == 1, group
    train = [r["question"] for r in db["examples"].rows if r["split"] == "train"]
    test = [r["question"] for r in db["examples"].rows if r["split"] == "test"]
    sims = embeddings.embed([dedupe.embedding_text(q) for q in train]) @ embeddings.embed([dedupe.embedding_text(q) for q in test]).T
    assert sims.max() < dedupe.NEAR_DUPLICATE_THRESHOLD


def test_test_set_is_frozen(db):
    import_rows(db, rows_for(QUESTIONS[:30]))
    test_before = {r["id"]: r["question"] for r in db["examples"].rows_where("split = 'test'")}
    assert test_before, "the first import creates a test set"

    later = import_rows(db, rows_for(QUESTIONS[30:]))
    assert later.splits["test"] == 0 and later.imported == 10
    # A paraphrase of a test question is held out rather than put in train (straddle) or test (growth).
    test_question = next(iter(test_before.values()))
    paraphrase = [{"question": "  " + test_question.upper() + "  ", "answer": "Something else entirely."}]
    held = import_rows(db, paraphrase)
    assert (held.imported, held.held_out_near_test) == (0, 1)
    assert {r["id"]: r["question"] for r in db["examples"].rows_where("split = 'test'")} == test_before

    # Explicit staff action: the test set may grow, and the paraphrase joins its cluster there.
    grown = import_rows(db, paraphrase, allow_test=True)
    assert grown.imported == 1 and grown.splits["test"] == 1
    assert split_counts(db)["test"] == len(test_before) + 1


def test_split_fractions_come_from_config(db):
    cfg = ImportConfig(val_fraction=0.0, test_fraction=0.0)
    result = import_rows(db, rows_for(QUESTIONS), cfg=cfg)
    assert result.splits == {"train": 40, "val": 0, "test": 0}


def test_cli_import_json_and_status(tmp_path, capsys):
    from tuneloop import cli

    path = write_csv(tmp_path / "faq.csv", ["q,a,intent"] + [f'"{q}","A{i}.",topic{i % 3}' for i, q in enumerate(QUESTIONS)])
    assert cli.main(["data", "import", str(path), "--question-col", "q", "--answer-col", "a", "--label-col", "intent", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["imported"] == 40 and payload["skipped_duplicates"] == 0
    assert cli.main(["data", "import", str(path), "--question-col", "q", "--answer-col", "a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_duplicates"] == 40
    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sum(status["examples"].values()) == 40 and set(status["examples"]) == {"train", "val", "test"}
    bad = write_csv(tmp_path / "bad.csv", ["question,answer", "q?,"])
    assert cli.main(["data", "import", str(bad)]) == 1
    assert "row 1 (line 2): empty answer" in capsys.readouterr().err


def test_all_pairs_in_a_group_are_near_duplicates():
    """The groups used above really are paraphrases to the detector (guards the test's premise)."""
    qs = [f"Cancel order {n}" for n in (1111, 2222)] + ["How do I close my account?", "HOW DO I CLOSE MY ACCOUNT ?"]
    vecs = embeddings.embed([dedupe.embedding_text(q) for q in qs])
    for i, j in itertools.combinations(range(2), 2):
        assert float(vecs[i] @ vecs[j]) >= dedupe.NEAR_DUPLICATE_THRESHOLD
    assert float(vecs[2] @ vecs[3]) >= dedupe.NEAR_DUPLICATE_THRESHOLD
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
