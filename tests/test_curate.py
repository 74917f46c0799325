"""Curation and snapshots: gold beats silver, thumbs-down never trains, decontamination, the
snapshot format and its atomic write, dry runs, the embedding cache, and the chosen threshold."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from assistant import paths
from assistant.paths import sha256_file
from assistant import embeddings
from feedback import curate, datasets, dedupe
from feedback.db import connect
from feedback.examples import ImportConfig, import_rows
from test_data import QUESTIONS, rows_for  # tests/ is on sys.path (pytest rootdir import mode)

# Silver (unapproved thumbs-ups) on, as most of these tests exercise it; off is the default, see
# test_by_default_an_unapproved_thumbs_up_never_trains.
CFG = dict(min_train_examples=1, warn_train_examples=1, include_thumbs_up=True)


@pytest.fixture(scope="session", autouse=True)
def embedder():
    return embeddings.load_embedder()


@pytest.fixture
def db():
    db = connect()
    db["staff_users"].insert({"name": "sam", "password_hash": "x", "created_at": "2025-01-01T00:00:00+00:00"})
    db["sessions"].insert({"id": "s1", "kind": "customer", "created_at": "2025-01-01T00:00:00+00:00"})
    return db


def turn(db, question, answer, at="2025-01-02T00:00:00+00:00"):
    return db["turns"].insert({"session_id": "s1", "question": question, "answer": answer, "status": "complete",
                               "created_at": at}).last_pk


def vote(db, turn_id, value, flagged=0, at="2025-01-02T00:01:00+00:00"):
    db["votes"].insert({"turn_id": turn_id, "session_id": "s1", "value": value, "flagged": flagged, "created_at": at})


def staff(db, kind, question, answer, turn_id=None, label=None, at="2025-01-03T00:00:00+00:00"):
    return db["corrections"].insert({"turn_id": turn_id, "kind": kind, "question": question, "answer": answer,
                                     "label": label, "staff_user": "sam", "created_at": at}).last_pk


def run(**overrides):
    return curate.main(curate.CurateConfig(**{**CFG, **overrides}))


def train_rows(result):
    return datasets.load_split(result.path, "train")


def test_correction_beats_original_answer(db):
    t = turn(db, "How do I order new checks?", "You cannot.")
    vote(db, t, 1)
    staff(db, "correction", "How do I order new checks?", "Order them in the app under Services.", turn_id=t)
    rows = train_rows(run())
    answers = {r["answer"] for r in rows}
    assert "Order them in the app under Services." in answers and "You cannot." not in answers
    assert [r["source"] for r in rows] == ["correction"]


def test_newest_gold_wins_among_duplicates_and_gold_beats_silver(db):
    t1 = turn(db, "Can I open an account online?", "Yes, in ten minutes.")
    vote(db, t1, 1)
    staff(db, "manual", "can I open an account  online?", "Yes, at peachstatebank.example.", at="2025-01-03T00:00:00+00:00")
    staff(db, "manual", "Can I open an account online?", "Yes, online or in a branch.", at="2025-01-04T00:00:00+00:00")
    result = run()
    assert [r["answer"] for r in train_rows(result)] == ["Yes, online or in a branch."]
    assert result.dropped["exact_duplicate"] == 2


def test_thumbs_down_alone_never_trains_and_thumbs_up_is_optional(db):
    down = turn(db, "Why was my card declined?", "Because you are broke.")
    vote(db, down, -1)
    up = turn(db, "What are your branch hours?", "Monday to Friday, 9 am to 5 pm.")
    vote(db, up, 1)
    result = run()
    assert [r["question"] for r in train_rows(result)] == ["What are your branch hours?"]
    assert result.dropped["thumbs_down"] == 1
    with pytest.raises(curate.CurateError, match="only 0 training examples"):
        run(include_thumbs_up=False)


def test_by_default_an_unapproved_thumbs_up_never_trains(db):
    # Anyone can vote (issue 25): with the defaults a thumbs-up trains only once staff approve it.
    assert curate.CurateConfig().include_thumbs_up is False
    up = turn(db, "What are your branch hours?", "Monday to Friday, 9 am to 5 pm.")
    vote(db, up, 1)
    approved = turn(db, "Do you have a mobile app?", "Yes, for iOS and Android.")
    vote(db, approved, 1)
    staff(db, "approval", "Do you have a mobile app?", "Yes, for iOS and Android.", turn_id=approved)
    rows = train_rows(curate.main(curate.CurateConfig(min_train_examples=1, warn_train_examples=1)))
    assert [(r["question"], r["source"]) for r in rows] == [("Do you have a mobile app?", "approval")]


def test_flagged_votes_are_ignored(db):
    t = turn(db, "Can I get a loan today?", "Yes, instantly.")
    vote(db, t, -1, at="2025-01-02T00:01:00+00:00")
    vote(db, t, 1, flagged=1, at="2025-01-02T00:02:00+00:00")  # a burst vote: kept as evidence, never counted
    other = turn(db, "Where can I find my routing number?", "On your checks and in the app.")
    vote(db, other, 1)
    rows = train_rows(run())
    assert [r["question"] for r in rows] == ["Where can I find my routing number?"]


def test_test_question_pasted_as_feedback_is_dropped(db):
    import_rows(db, rows_for(QUESTIONS))
    test_question = next(db["examples"].rows_where("split = 'test'"))["question"]
    staff(db, "manual", "  " + test_question.upper(), "A copy of the test answer.")
    t = turn(db, test_question.lower() + "!", "Leaked.")
    vote(db, t, 1)
    result = run()
    assert result.dropped["contaminated"] == 2
    train_questions = [r["question"] for r in train_rows(result)]
    assert all(dedupe.normalize(q).rstrip("!") != dedupe.normalize(test_question) for q in train_questions)
    manifest = datasets.load_manifest(result.path)
    assert any("test row" in reason for reason in manifest["dropped_rows"].values())


def test_feedback_goes_to_train_never_test(db):
    import_rows(db, rows_for(QUESTIONS))
    staff(db, "manual", "Do you offer safe deposit boxes?", "Yes, at most branches.")
    result = run()
    for split in ("val", "test"):
        assert all(r["source"] == "import" for r in datasets.load_split(result.path, split))
    assert "manual" in {r["source"] for r in train_rows(result)}


def test_snapshot_format_and_manifest_hashes(db):
    import_rows(db, rows_for(QUESTIONS, label="faq"))
    staff(db, "manual", "Do you offer safe deposit boxes?", "Yes, at most branches.", label="branches")
    result = run()
    path = datasets.latest_snapshot()
    assert path is not None and path.name == result.version == "d0001" and str(path) == result.path
    manifest = datasets.load_manifest(path)
    for split in datasets.SPLITS:
        file = path / f"{split}.jsonl"
        assert manifest["files"][f"{split}.jsonl"]["sha256"] == sha256_file(file)
        rows = datasets.load_split(path, split)
        assert len(rows) == manifest["counts"][split] == result.counts[split]
        assert manifest["row_ids"][split] == [r["id"] for r in rows]
        for row in rows:
            assert list(row) == ["id", "question", "answer", "label", "source"]
            assert isinstance(row["id"], str) and row["source"] in datasets.ROW_SOURCES
    assert manifest["by_source"]["train"]["manual"] == 1
    assert manifest["by_label"]["train"]["branches"] == 1
    assert manifest["config"]["near_duplicate_threshold"] == dedupe.NEAR_DUPLICATE_THRESHOLD
    assert db["dataset_versions"].get("d0001")["train"] == result.counts["train"]

    # Unchanged data: no new version.
    again = run()
    assert again.unchanged and again.version == "d0001"
    assert [p.name for p in datasets.snapshots()] == ["d0001"]

    # A change: d0002 records what was added and why rows left.
    staff(db, "manual", "Can I get cash back at the register?", "Yes, up to $100.")
    t = turn(db, "Can I bank on Sundays?", "Online, yes.")
    vote(db, t, 1)
    staff(db, "correction", "Can I bank on Sundays?", "Online and at ATMs, yes.", turn_id=t)
    second = run()
    assert second.version == "d0002"
    changes = datasets.load_manifest(datasets.latest_snapshot())["changes"]
    assert changes["previous"] == "d0001"
    assert {"corrections:2", "corrections:3"} <= set(changes["added"]["train"])


def test_dry_run_writes_nothing(db):
    import_rows(db, rows_for(QUESTIONS))
    cached = db["embeddings"].count
    staff(db, "manual", "Do you offer safe deposit boxes?", "Yes, at most branches.")
    result = run(dry_run=True)
    assert result.dry_run and result.version == "d0001" and result.counts["train"] > 0
    assert datasets.latest_snapshot() is None
    assert list(paths.datasets_dir().iterdir()) == []
    assert db["dataset_versions"].count == 0
    assert db["embeddings"].count == cached


def test_full_disk_leaves_previous_version_intact(db, monkeypatch):
    import_rows(db, rows_for(QUESTIONS))
    first = run()
    before = {p.name: p.read_bytes() for p in datasets.latest_snapshot().iterdir()}
    staff(db, "manual", "Do you offer safe deposit boxes?", "Yes, at most branches.")

    real_write = datasets._write_file

    def full_disk(path, data):
        if path.name == "val.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(datasets, "_write_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run()
    assert datasets.latest_snapshot().name == first.version
    assert {p.name: p.read_bytes() for p in datasets.latest_snapshot().iterdir()} == before
    assert [p.name for p in paths.datasets_dir().iterdir()] == [first.version]  # no temp folder left
    assert db["dataset_versions"].count == 1

    monkeypatch.setattr(datasets, "_write_file", real_write)
    assert run().version == "d0002"


def test_embeddings_are_cached_across_curations(db, monkeypatch):
    calls: list[int] = []
    real_embed = embeddings.embed

    def counting_embed(texts, *args, **kwargs):
        calls.append(len(texts))
        return real_embed(texts, *args, **kwargs)

    monkeypatch.setattr(embeddings, "embed", counting_embed)
    import_rows(db, rows_for(QUESTIONS))
    assert sum(calls) == len(QUESTIONS)
    calls.clear()
    run()
    assert sum(calls) == 0  # every question was embedded at import
    staff(db, "manual", "Do you offer safe deposit boxes?", "Yes, at most branches.")
    run()
    assert sum(calls) == 1  # only the new question
    calls.clear()
    run()
    assert calls == []


def test_guardrails_refuse_warn_and_report_labels(db):
    import_rows(db, [{"question": q, "answer": "A.", "label": "common" if i else "rare"} for i, q in enumerate(QUESTIONS)],
                cfg=ImportConfig(val_fraction=0.0, test_fraction=0.0))
    with pytest.raises(curate.CurateError, match="at least 50 are needed"):
        curate.main(curate.CurateConfig(min_train_examples=50, warn_train_examples=100))
    result = curate.main(curate.CurateConfig())
    assert result.labels == {"common": 39, "rare": 1}
    assert any("fewer than 100" in w for w in result.warnings)
    assert any("unbalanced" in w for w in result.warnings)


def test_cli_curate_json(db, capsys):
    from tuneloop import cli

    import_rows(db, rows_for(QUESTIONS))
    assert cli.main(["curate", "--dry-run", "--json", "--min-train-examples", "5", "--warn-train-examples", "5"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"version", "path", "counts", "dropped"} <= set(payload) and payload["dry_run"] is True
    assert datasets.latest_snapshot() is None
    assert cli.main(["curate", "--json", "--min-train-examples", "5", "--warn-train-examples", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "d0001"
    assert cli.main(["curate", "--min-train-examples", "500", "--warn-train-examples", "500"]) == 1
    assert "min_train_examples" in capsys.readouterr().err


def test_chosen_threshold_precision_and_recall_on_bitext(shared_data):
    """The detector's precision on real Bitext paraphrases at the chosen threshold (a small sample
    of the benchmark's pairs; the full table is benchmarks/dedupe_threshold.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import dedupe_threshold as bench

    rows = bench.load_rows(shared_data / "bitext" / "bitext_customer_support.csv")
    positives, negatives = bench.build_pairs(rows, per_kind=120, seed=1)
    sims_pos, sims_neg = bench.pair_similarities(rows, positives, negatives)
    (at_chosen,) = bench.sweep(sims_pos, sims_neg, [dedupe.NEAR_DUPLICATE_THRESHOLD])
    assert at_chosen["precision"] >= 0.8
    assert at_chosen["recall"] >= 0.1
    (looser,) = bench.sweep(sims_pos, sims_neg, [0.7])
    assert looser["precision"] < at_chosen["precision"]  # why not lower: precision falls fast
