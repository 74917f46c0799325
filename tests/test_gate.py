"""The promotion gate on scripted evaluations: a real gain passes; equal, worse, noisy and
forgetting candidates are rejected; every decision is stored with its reasons; rollback works."""

from __future__ import annotations

import json

import pytest

from assistant import adapters
from assistant.config import ServeConfig
from evals import evaluate, gate, schema
from feedback import review

LABELS = ["cards", "loans", "savings", "mortgage"]
N = 80


class FirstWordLabeler:
    """Stands in for the embedding labeler: the label is the answer's first word."""

    def predict(self, texts):
        return [text.split()[0] if text.split() else "" for text in texts]


def make_test_set(n: int = N) -> evaluate.EvalSet:
    examples = [
        {"id": f"t{i}", "question": f"question {i}", "answer": f"{LABELS[i % 4]} answer number {i}", "label": LABELS[i % 4]}
        for i in range(n)
    ]
    return evaluate.EvalSet("d0001", examples, [])


def scripted(correct_share: dict[str | None, float], perplexity: dict[str | None, float] | None = None):
    """A runner whose adapter answers the first ``share`` of questions right and the rest wrong."""

    def answer(adapter, question):
        i = int(question.split()[-1])
        right = i < correct_share[adapter] * N
        label = LABELS[i % 4] if right else LABELS[(i + 1) % 4]
        return f"{label} answer number {i}"

    return evaluate.ScriptedRunner(answer, perplexity or {None: 10.0, "cand": 10.0, "cur": 10.0})


def reports(shares, perplexity=None):
    runner = scripted(shares, perplexity)
    serve = ServeConfig()
    test = make_test_set()
    labeler = FirstWordLabeler()
    return {
        adapter: evaluate.evaluate(runner, test, adapter, serve, labeler, general_texts=["some general text"])
        for adapter in shares
    }


def decide(shares, perplexity=None, **overrides):
    found = reports({None: 0.0} | shares, perplexity)  # the base model's report is always there, as in the pipeline
    incumbent = found["cur"] if "cur" in shares else found[None]
    return gate.decide_promotion(found["cand"], incumbent, gate.GateConfig(**overrides), base=found[None])


def test_real_gain_is_promoted():
    decision = decide({None: 0.5, "cand": 0.9})
    assert decision.promote, decision.reasons
    assert decision.metrics["delta"] > 0.3
    assert decision.metrics["p_not_better"] <= 0.1
    assert all(reason.startswith("PASS") for reason in decision.reasons)
    assert "the base model" in decision.reasons[0]  # first promotion compares against the base


def test_equal_candidate_is_rejected():
    decision = decide({"cur": 0.7, "cand": 0.7})
    assert not decision.promote
    assert decision.reasons[0].startswith("FAIL gain")
    assert decision.metrics["delta"] == pytest.approx(0.0)


def test_worse_candidate_is_rejected():
    decision = decide({"cur": 0.8, "cand": 0.6})
    assert not decision.promote
    assert decision.metrics["delta"] < 0
    assert decision.reasons[0].startswith("FAIL gain")


def test_noisy_gain_is_rejected_by_the_bootstrap():
    # Two more right answers out of 80: past a zero min_delta, but not past test-set luck.
    decision = decide({"cur": 0.5, "cand": 0.525}, min_delta=0.0)
    assert decision.reasons[0].startswith("PASS gain")
    assert decision.reasons[1].startswith("FAIL not noise")
    assert decision.metrics["p_not_better"] > 0.1
    assert not decision.promote


def test_forgetting_candidate_is_rejected_by_perplexity():
    decision = decide({"cur": 0.5, "cand": 0.9}, perplexity={None: 10.0, "cur": 10.0, "cand": 14.0})
    assert decision.reasons[0].startswith("PASS") and decision.reasons[1].startswith("PASS")
    assert decision.reasons[2].startswith("FAIL no forgetting")
    assert "(the base model), ratio 1.400 > 1.250" in decision.reasons[2]
    assert decision.metrics["perplexity_ratio"] == pytest.approx(1.4)
    assert not decision.promote


def test_forgetting_is_measured_against_the_base_model_not_the_incumbent():
    # Every candidate trains from the base: an incumbent that lowered perplexity does not raise the
    # bar (the real case: incumbent 39.2, base 43.3, candidate 51.2), and one that forgot does not lower it.
    kept = decide({"cur": 0.5, "cand": 0.9}, perplexity={None: 43.3, "cur": 39.2, "cand": 51.2})
    assert kept.promote, kept.reasons
    assert kept.metrics["perplexity_ratio"] == pytest.approx(51.2 / 43.3)
    assert kept.metrics["incumbent_perplexity"] == 39.2
    forgot = decide({"cur": 0.5, "cand": 0.9}, perplexity={None: 10.0, "cur": 13.0, "cand": 13.0})
    assert not forgot.promote and forgot.reasons[2].startswith("FAIL no forgetting")
    found = reports({None: 0.5, "cur": 0.5, "cand": 0.9})
    with pytest.raises(ValueError, match="base model's report"):
        gate.decide_promotion(found["cand"], found["cur"], gate.GateConfig(), base=found["cur"])


def test_answer_f1_is_the_metric_without_labels():
    runner = evaluate.ScriptedRunner(lambda adapter, q: "the answer" if adapter else "nothing", {None: 5.0, "cand": 5.0})
    test = evaluate.EvalSet("file", [{"id": i, "question": f"q {i}", "answer": "the answer", "label": None} for i in range(30)], [])
    base = evaluate.evaluate(runner, test, None, ServeConfig(), None, general_texts=["x y"])
    cand = evaluate.evaluate(runner, test, "cand", ServeConfig(), None, general_texts=["x y"])
    assert cand.metric == "answer_f1" and cand.label_f1 is None
    decision = gate.decide_promotion(cand, base, gate.GateConfig(), base=base)
    assert decision.promote and decision.metrics["metric"] == "answer_f1"


def test_gate_config_checks_say_what_to_change():
    with pytest.raises(ValueError, match="max_perplexity_ratio must be at least 1.0"):
        gate.GateConfig(max_perplexity_ratio=0.9)
    with pytest.raises(ValueError, match="max_p_not_better"):
        gate.GateConfig(max_p_not_better=2)


def test_decisions_are_stored_with_reasons_rejections_included(tuneloop_home):
    db = schema.connect()
    accepted = decide({None: 0.5, "cand": 0.9})
    rejected = decide({"cur": 0.8, "cand": 0.6})
    gate.record_decision(db, accepted, "cand", None, gate.GateConfig())
    gate.record_decision(db, rejected, "cand", "cur", gate.GateConfig())
    rows = list(schema.connect()["gate_decisions"].rows)  # a fresh connection sees both: committed
    assert [row["promote"] for row in rows] == [1, 0]
    assert json.loads(rows[1]["reasons"]) == rejected.reasons
    assert json.loads(rows[1]["metrics"])["delta"] == pytest.approx(rejected.metrics["delta"])
    latest = review.last_decision(db)
    assert latest.promote is False and latest.incumbent == "cur"
    assert "rejected" in review.decision_text(latest)


def test_schema_migrates_a_blank_database_and_is_pinned():
    db = schema.connect(":memory:")
    ours = {"retrain_runs", "gate_decisions", "eval_reports", "review_pairs", "review_marks"}
    assert ours <= set(db.table_names())
    assert [c.name for c in db["review_marks"].columns] == ["id", "pair_id", "side", "staff_user", "helpful", "created_at"]
    assert [c.name for c in db["gate_decisions"].columns] == [
        "id", "run_id", "candidate", "incumbent", "promote", "reasons", "metrics", "config", "created_at"]
    applied = [m.name for m in schema.migrations.applied(db)]
    assert applied == ["0001_retrain_and_gate", "0002_human_review"]
    before = db.execute("select sql from sqlite_master order by name").fetchall()
    schema.apply(db)
    assert db.execute("select sql from sqlite_master order by name").fetchall() == before
    # The feedback set is untouched by ours: both sets are recorded under their own names.
    sets = {row[0] for row in db.execute("select distinct migration_set from _sqlite_migrations")}
    assert sets == {"tuneloop", "tuneloop-evals"}


def _fake_adapter(version: str) -> None:
    folder = adapters.adapter_path(version)
    folder.mkdir(parents=True)
    (folder / adapters.WEIGHTS_FILE).write_bytes(b"x")


def test_rollback_restores_the_previous_pointer(tuneloop_home, capsys):
    from tuneloop import cli

    for version in ("v1", "v2"):
        _fake_adapter(version)
    adapters.set_current("v1", "first")
    adapters.set_current("v2", "second")
    assert cli.main(["adapters", "rollback", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert adapters.current_version() == "v1"
    assert cli.main(["adapters", "rollback"]) == 0
    assert adapters.current_version() is None  # back to the base model
    assert cli.main(["adapters", "rollback"]) == 2  # nothing older: refused, pointer unchanged
    assert adapters.current_version() is None


def test_a_rise_of_invented_facts_is_refused_and_the_reason_kept(tuneloop_home):
    def answers(invented: dict):
        # "cand" always right; the first share of its answers (and of the incumbent's) quote a fee from nowhere.
        def answer(adapter, question):
            i = int(question.split()[-1])
            fee = " The fee is $39." if i < invented.get(adapter, 0.0) * N else ""
            return f"{LABELS[i % 4] if adapter == 'cand' or i < 40 else LABELS[(i + 1) % 4]} answer number {i}.{fee}"
        return answer

    def decide_with(invented: dict, **overrides):
        runner = evaluate.ScriptedRunner(answers(invented), {None: 10.0, "cur": 10.0, "cand": 10.0})
        found = {a: evaluate.evaluate(runner, make_test_set(), a, ServeConfig(), FirstWordLabeler(), general_texts=["x"])
                 for a in (None, "cur", "cand")}
        return gate.decide_promotion(found["cand"], found["cur"], gate.GateConfig(**overrides), base=found[None])

    refused = decide_with({"cur": 0.05, "cand": 0.10})
    assert not refused.promote
    assert [reason.split(":")[0] for reason in refused.reasons] == [
        "PASS gain", "PASS not noise", "PASS no forgetting", "FAIL no invented facts"]
    assert "unsupported_facts 0.100 vs 0.050 (cur), rise +0.050 > max_unsupported_rise 0.020" in refused.reasons[3]
    assert refused.metrics["unsupported_rise"] == pytest.approx(0.05)
    db = schema.connect()
    gate.record_decision(db, refused, "cand", "cur", gate.GateConfig())
    assert json.loads(next(db["gate_decisions"].rows)["reasons"])[3] == refused.reasons[3]
    # Within the allowance (one answer in 80), or allowed more, it passes.
    assert decide_with({"cur": 0.05, "cand": 0.0625}).promote
    assert decide_with({"cur": 0.05, "cand": 0.10}, max_unsupported_rise=0.05).promote
    with pytest.raises(ValueError, match="max_unsupported_rise must be between 0 and 1"):
        gate.GateConfig(max_unsupported_rise=-0.1)
