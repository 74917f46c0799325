"""Load: customers chat and vote through the real app (its own process, 127.0.0.1, gradio_client)
while the nightly job's curation (and, in the slow test, a trainer subprocess on the tiny model)
writes to the same database. Every acknowledged turn and vote must be stored, no customer may see
"database is locked" (or any error), and the file must pass ``PRAGMA integrity_check``."""

from __future__ import annotations

import pytest

from assistant import paths
from reliability_harness import check_stored, integrity_check, load_during_curation, rows

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def assert_nothing_lost(ledger, summary, customers: int) -> None:
    db = paths.feedback_db()
    assert ledger.sessions == customers
    assert not [e for e in ledger.errors if "locked" in e.lower()], "'database is locked' reached a customer"
    assert ledger.errors == []
    assert ledger.turns and len(ledger.votes) == len(ledger.turns)
    stored = check_stored(db, ledger)
    assert stored.lost == 0, (stored.lost_turns[:5], stored.lost_votes[:5])
    assert integrity_check(db) == "ok"
    assert summary["errors"] == [] and summary["curations"] >= 2, summary
    print(f"\n{customers} customers: {len(ledger.turns)} turns, {len(ledger.votes)} votes, lost 0, "
          f"p99 answer latency {ledger.p99():.3f} s, {summary['curations']} curations, snapshots {summary['snapshots']}")


def test_fifty_customers_lose_nothing_while_curation_writes(tuneloop_home):
    ledger, summary = load_during_curation(tuneloop_home, customers=50, seconds=10)
    assert_nothing_lost(ledger, summary, 50)
    assert len(summary["snapshots"]) >= 2  # customers' thumbs-up answers reached a new snapshot mid-load


@pytest.mark.slow
def test_fifty_customers_lose_nothing_while_a_candidate_trains(tuneloop_home, tiny_model_dir):
    ledger, summary = load_during_curation(tuneloop_home, customers=50, seconds=20, train_model=tiny_model_dir)
    assert_nothing_lost(ledger, summary, 50)
    assert summary["adapter"], "the trainer subprocess produced no candidate"


@pytest.mark.slow
def test_real_model_customers_lose_nothing_while_a_candidate_trains(tuneloop_home, tiny_model_dir):
    # The real TransformersBackend (tiny model, nf4 on CPU) serves 5 customers while the job curates
    # and trains a candidate adapter in a trainer subprocess against the same home.
    ledger, summary = load_during_curation(tuneloop_home, customers=5, seconds=20, serve_model=tiny_model_dir,
                                           train_model=tiny_model_dir)
    assert_nothing_lost(ledger, summary, 5)
    assert summary["adapter"], "the trainer subprocess produced no candidate"
    assert rows(paths.feedback_db(), "SELECT DISTINCT base_model FROM turns") == [(str(tiny_model_dir),)]
