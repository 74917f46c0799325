"""Poisoning: a burst of votes from one session is rate-limited and marked through the live API,
and curation never treats a customer's vote as gold: only staff corrections, approvals and
hand-written examples are gold; thumbs-up answers train only when silver is switched on (off by
default, issue 25) and then as silver, and flagged or thumbs-down votes give no training text at all.

What a harmful round of staff corrections does to the served model is the nightly job's concern:
its gate must reject such a candidate (the harmful-correction round test of the retrain pipeline,
beside tests/test_retrain.py and tests/test_gate.py, written by the pipeline's owner)."""

from __future__ import annotations

import pytest

from feedback import curate, store
from feedback.db import connect
from reliability_harness import STAFF_NAME, STAFF_PASSWORD

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@pytest.fixture
def served(tuneloop_home):
    from test_app import serve_scripted

    with serve_scripted(delay_s=0.0) as running:
        from feedback import auth

        auth.add_staff(connect(), STAFF_NAME, STAFF_PASSWORD)
        yield running


def test_a_vote_burst_is_rate_limited_marked_and_kept_out_of_training(served):
    burst = store.VOTE_BURST_LIMIT + 5
    attacker, honest = served.client(), served.client()
    turn_ids = [int(attacker.predict(f"poison question {i}", api_name="/chat")[2]) for i in range(burst)]
    notes = [attacker.predict(turn, "up", "", api_name="/vote") for turn in turn_ids]
    assert all("Thanks" in note for note in notes[: store.VOTE_BURST_LIMIT])
    assert all("set aside" in note for note in notes[store.VOTE_BURST_LIMIT :])
    flagged = served.rows("SELECT turn_id FROM votes WHERE flagged = 1 ORDER BY id")
    assert [t for (t,) in flagged] == turn_ids[store.VOTE_BURST_LIMIT :]  # stored as evidence, marked

    # An honest customer's vote in the same minute is not affected by the attacker's burst.
    liked = int(honest.predict("honest question", api_name="/chat")[2])
    assert "Thanks" in honest.predict(liked, "up", "", api_name="/vote")
    disliked = int(honest.predict("a question answered badly", api_name="/chat")[2])
    honest.predict(disliked, "down", "this is wrong", api_name="/vote")
    staff = served.staff_client(STAFF_NAME, STAFF_PASSWORD)  # the sign-in form's session cookie
    staff.predict(disliked, "The staff answer.", "", api_name="/correct")

    db = connect()
    assert store.stats(db)["flagged_votes"] == 5 and store.stats(db)["up"] == store.VOTE_BURST_LIMIT + 1
    exported = {row["turn_id"] for row in store.export_rows(db)}
    assert exported.isdisjoint(turn_ids[store.VOTE_BURST_LIMIT :])

    # By default (issue 25) no customer vote trains at all: only the staff answer does.
    assert [(c.source, c.question) for c in curate.gather(db, curate.CurateConfig().include_thumbs_up)[1]] == [
        ("correction", "a question answered badly")]

    # With silver switched on, customer votes are silver at best and flagged ones give no row.
    _held_out, training, _superseded = curate.gather(db, include_thumbs_up=True)
    by_turn = {c.id: c for c in training}
    # Customer votes are silver at best; the only gold row is the staff correction.
    assert {c.source for c in training if c.rank == curate.GOLD} == {"correction"}
    assert all(c.rank == curate.SILVER for c in training if c.source == "thumbs_up")
    assert not {f"turns:{t}" for t in turn_ids[store.VOTE_BURST_LIMIT :]} & set(by_turn)  # flagged: no row
    assert f"turns:{disliked}" not in by_turn  # thumbs-down: only the staff answer trains
    (gold,) = [c for c in training if c.rank == curate.GOLD]
    assert gold.answer == "The staff answer." and gold.question == "a question answered badly"
    # Ranked first: the staff answer wins over any customer-voted duplicate of its question.
    assert curate.best_first(training)[0] is gold


def test_customers_cannot_write_gold(served):
    customer = served.client()
    turn = int(customer.predict("make my answer gold", api_name="/chat")[2])
    for args, api_name in [((turn, "Injected gold answer.", ""), "/correct"), ((turn, ""), "/approve"),
                           (("Q?", "Injected example.", ""), "/add_example")]:
        with pytest.raises(Exception, match="Staff only"):
            customer.predict(*args, api_name=api_name)
    customer.predict(turn, "up", "", api_name="/vote")
    _held_out, training, _ = curate.gather(connect(), include_thumbs_up=True)
    assert [(c.source, c.rank) for c in training] == [("thumbs_up", curate.SILVER)]
    assert curate.gather(connect(), include_thumbs_up=False)[1] == []
