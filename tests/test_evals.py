"""Evaluation on the tiny model in the served configuration, `tuneloop eval --json`, the report,
and the blind side-by-side review."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from assistant import adapters, paths
from assistant.chat import REFERENCES_INTRO
from assistant.config import ServeConfig
from evals import evaluate, report, review, schema
from feedback import review as staff_review

PACK_QA = Path(__file__).resolve().parents[1] / "assistant" / "packs" / "peach_state_bank" / "qa.jsonl"


def write_snapshot(version: str = "d0001", train: int = 24, val: int = 8, test: int = 8, offset: int = 0) -> Path:
    """A dataset snapshot in the documented format, written directly from the pack's Q/A."""
    rows = [json.loads(line) for line in PACK_QA.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[offset : offset + train + val + test]
    folder = paths.datasets_dir() / version
    folder.mkdir(parents=True)
    splits = {"train": rows[:train], "val": rows[train : train + val], "test": rows[train + val :]}
    for name, split in splits.items():
        lines = [json.dumps({"id": f"{name}-{i + offset}", "question": r["question"], "answer": r["answer"],
                             "label": r["label"], "source": "pack"}) for i, r in enumerate(split)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"version": version, "counts": {k: len(v) for k, v in splits.items()}}))
    return folder


def write_config(tiny_model_dir: Path, extra: str = "") -> None:
    """Serve (and train) the tiny model on CPU through the config file, as an operator would."""
    paths.config_file().write_text(
        f'[serve]\nbase_model = "{tiny_model_dir}"\ndevice = "cpu"\nmax_new_tokens = 8\n'
        '[train]\nmax_steps = 2\nbatch_size = 8\nmin_train_examples = 4\nprogress = false\n' + extra,
        encoding="utf-8",
    )


@pytest.fixture
def tiny_serve(tiny_model_dir) -> ServeConfig:
    return ServeConfig(base_model=str(tiny_model_dir), quantization="nf4", device="cpu", max_new_tokens=8)


def test_base_and_adapter_share_one_loaded_base(tiny_model_dir, tiny_serve):
    from test_assistant import make_adapter

    version = make_adapter(tiny_model_dir, seed=3)
    runner = evaluate.ModelRunner(tiny_serve)
    conversations = [[{"role": "user", "content": q}] for q in ("What is Peach Checking?", "hi", "Do you offer loans?")]
    before = runner.generate(conversations, None, batch_size=2)
    tuned = runner.generate(conversations, version, batch_size=2)
    after = runner.generate(conversations, None, batch_size=3)
    assert [g.text for g in tuned] != [g.text for g in before]  # the adapter is really applied
    assert [g.text for g in after] == [g.text for g in before]  # and really switched off again
    assert all(1 <= g.tokens_out <= 8 and g.prompt_tokens > 0 and g.latency_s > 0 for g in before)
    # Left padding: a batch of one gives the same greedy answer as inside a batch of three.
    assert runner.generate(conversations[1:2], None, batch_size=1)[0].text == after[1].text
    assert runner.perplexity(["The sun rises in the east."], version) != runner.perplexity(["The sun rises in the east."], None)


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_continuous_batching_gives_the_padded_batches_greedy_answers(tiny_model_dir, quantization):
    """The CUDA evaluation path (transformers' generate_batch), run on the CPU: the same answers as
    the padded batches, for the base and with an adapter, and it leaves the padded path unchanged."""
    from test_assistant import make_adapter

    version = make_adapter(tiny_model_dir, seed=3)
    serve = ServeConfig(base_model=str(tiny_model_dir), quantization=quantization, device="cpu", max_new_tokens=12,
                        repetition_penalty=1.0)
    runner = evaluate.ModelRunner(serve)
    assert runner.continuous is False  # on a CPU the padded batches stay the default
    conversations = [[{"role": "system", "content": "You answer for Peach State Bank."}, {"role": "user", "content": q}]
                     for q in ("What is Peach Checking?", "hi", "Do you offer loans for a used car bought privately?")]
    padded = {adapter: runner.generate(conversations, adapter, batch_size=3) for adapter in (None, version)}
    runner.continuous = True
    continuous = {adapter: runner.generate(conversations, adapter, batch_size=3) for adapter in (None, version)}
    for adapter in (None, version):
        assert [(g.text, g.tokens_out, g.prompt_tokens) for g in continuous[adapter]] == \
            [(g.text, g.tokens_out, g.prompt_tokens) for g in padded[adapter]], adapter
    assert [g.text for g in continuous[version]] != [g.text for g in continuous[None]]  # the adapter applies
    runner.continuous = False
    assert [g.text for g in runner.generate(conversations, None, batch_size=2)] == [g.text for g in padded[None]]
    # It would score answers nobody is served: continuous batching drops the repetition penalty.
    with pytest.raises(ValueError, match="repetition penalty"):
        evaluate.ModelRunner(dataclasses.replace(serve, repetition_penalty=1.1), continuous=True)


def test_eval_json_keys_on_the_tiny_model(tiny_model_dir, capsys):
    from tuneloop import cli

    write_config(tiny_model_dir)
    write_snapshot()
    assert cli.main(["eval", "--adapter", "base", "--limit", "4", "--json", "--baselines"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"f1", "label_f1", "answer_f1", "rouge_l", "bleu", "n", "adapter", "per_label", "latency_s",
            "tokens_per_answer", "baselines"} <= set(payload)
    assert payload["n"] == 4 and payload["adapter"] is None and payload["metric"] == "label_f1"
    assert payload["f1"] == payload["label_f1"] and 0.0 <= payload["f1"] <= 1.0
    low, high = payload["f1_ci"]
    assert 0.0 <= low <= payload["f1"] <= high <= 1.0
    assert payload["baselines"]["few_shot"]["prompt_tokens"] > payload["baselines"]["base"]["prompt_tokens"]
    # The base model is scored with the serve config's references, from the snapshot's train split.
    assert payload["retrieval"] == {"k": ServeConfig.retrieval_k, "min_score": ServeConfig.retrieval_min_score}
    assert payload["baselines"]["few_shot"]["retrieval"] is None
    assert 0.0 <= payload["knn_label_f1"] <= 1.0 and 0.0 <= payload["unsupported_facts"] <= 1.0
    # The labeler was fitted once and cached under the home.
    assert list((paths.home() / "evals" / "labelers").glob("*/labeler.json"))
    assert schema.connect()["eval_reports"].count == 1


def test_eval_reads_a_csv_file_with_named_columns(tiny_model_dir, tmp_path, capsys):
    from tuneloop import cli

    write_config(tiny_model_dir)
    file = tmp_path / "extra.csv"
    file.write_text("q,a\nWhat is Peach Checking?,Peach Checking is an account.\nhi,Hello!\n", encoding="utf-8")
    assert cli.main(["eval", "--adapter", "base", "--dataset", str(file), "--question-col", "q",
                     "--answer-col", "a", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["n"] == 2 and payload["metric"] == "answer_f1" and payload["label_f1"] is None


def test_eval_refuses_bad_input_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    from tuneloop import cli

    write_config(tiny_model_dir)
    write_snapshot()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "hi", "answer": "hello"}\n{"question": "hi", \n', encoding="utf-8")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("question,answer\nca\xe7a,non\n".encode("latin-1"))
    for argv, message in (
        (["--adapter", "a0042"], "no adapter 'a0042'"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--dataset", str(broken)], "broken.jsonl:2: not JSON"),
        (["--dataset", str(latin1)], "is not UTF-8 text"),
    ):
        assert cli.main(["eval", *argv]) == 2
        assert message in capsys.readouterr().err
    # A damaged snapshot names the file and line.
    (paths.datasets_dir() / "d0001" / "test.jsonl").write_text('{"id": "x", "question": "", "answer": "a"}\n', encoding="utf-8")
    assert cli.main(["eval"]) == 2
    assert "test.jsonl:1: row 'x' needs a non-empty question and answer" in capsys.readouterr().err
    assert schema.connect()["eval_reports"].count == 0


def test_few_shot_examples_cover_different_labels():
    train = [{"question": f"q{i}", "answer": f"a{i}", "label": "x" if i < 10 else "y"} for i in range(12)]
    shots = evaluate.few_shot_examples(train, 2, seed=0)
    assert len(shots) == 2
    labels = {next(r["label"] for r in train if r["question"] == q) for q, _ in shots}
    assert labels == {"x", "y"}


def scripted_reports() -> tuple[evaluate.EvalReport, evaluate.EvalReport]:
    examples = [{"id": i, "question": f"question {i}", "answer": f"ref {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    test = evaluate.EvalSet("d0001", examples, [])

    class Echo:
        def predict(self, texts):
            return [t.split()[0] for t in texts]

    # The candidate names the right label every time; the base always says "b" (right half the time).
    right = {f"question {e['id']}": e["label"] for e in examples}
    runner = evaluate.ScriptedRunner(lambda adapter, q: (right[q] if adapter == "cand" else "b") + " " + q,
                                     {None: 9.0, "cand": 9.5})
    cand = evaluate.evaluate(runner, test, "cand", ServeConfig(), Echo(), general_texts=["x"])
    base = evaluate.evaluate(runner, test, None, ServeConfig(), Echo(), general_texts=["x"])
    return cand, base


def test_report_json_keeps_its_keys_and_reads_back():
    # The keys stored in eval_reports.report and eval_report.json and printed by `tuneloop eval --json`
    # since reports were dicts; a stored report reads back as the same EvalReport.
    cand, base = scripted_reports()
    assert list(cand.to_json()) == [
        "adapter", "dataset", "n", "answer_f1", "rouge_l", "bleu", "latency_s", "tokens_per_answer", "prompt_tokens",
        "few_shot_k", "label_f1", "label_precision", "label_recall", "per_label", "confusions", "perplexity", "metric",
        "f1", "f1_ci", "retrieval", "knn_label_f1", "unsupported_facts", "examples"]
    assert evaluate.EvalReport.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    cand.baselines = {"base": base}
    printed = cand.to_json(examples=False)
    assert "examples" not in printed and "examples" not in printed["baselines"]["base"]
    assert evaluate.EvalReport.from_json(printed).baselines["base"].f1 == base.f1
    older = {k: v for k, v in base.to_json().items()
             if k not in ("f1_ci", "label_precision", "label_recall", "retrieval", "knn_label_f1", "unsupported_facts")}
    old = evaluate.EvalReport.from_json(older)
    assert old.f1_ci is None  # stored before intervals were
    assert old.retrieval is None and old.knn_label_f1 is None and old.unsupported_facts is None  # and before references


def test_blind_review_pairs_marks_and_shares(tuneloop_home):
    db = schema.connect()
    cand, base = scripted_reports()
    review.create_batch(db, cand, base, n=12, seed=1)
    pairs = list(db["review_pairs"].rows)
    assert len(pairs) == 12
    assert {p["left_adapter"] for p in pairs} == {"cand", None}  # sides really are randomized
    shown = staff_review.next_pair(db, "alice")
    assert set(shown) == {"pair_id", "question", "left", "right"}  # no adapter names: blind
    for pair in pairs:
        left_is_candidate = pair["left_adapter"] == "cand"
        staff_review.mark_pair(db, "alice", pair["id"], left_helpful=left_is_candidate, right_helpful=not left_is_candidate)
    assert staff_review.next_pair(db, "alice") is None
    assert staff_review.next_pair(db, "bob") is not None
    staff_review.mark_pair(db, "alice", pairs[0]["id"], True, True)  # marking again replaces
    shares = {s["adapter"]: s for s in staff_review.helpful_shares(db)}
    assert shares["cand"]["marks"] == 12 and shares["cand"]["helpful_share"] == pytest.approx(1.0)
    assert shares["base"]["helpful_share"] == pytest.approx(1 / 12)
    with pytest.raises(staff_review.ReviewError):
        staff_review.mark_pair(db, "alice", 999, True, True)


def test_review_readers_before_any_retrain(tuneloop_home):
    from feedback.db import connect

    db = connect()  # the feedback tables only: the app may read before any retrain ran
    assert staff_review.next_pair(db, "alice") is None
    assert staff_review.helpful_shares(db) == [] and staff_review.f1_history(db) == []
    assert staff_review.decision_text(staff_review.last_decision(db)) == "No retrain has run yet."


def test_report_writes_html_and_pngs(tuneloop_home):
    from evals import gate

    db = schema.connect()
    cand, base = scripted_reports()
    run_id = db["retrain_runs"].insert({"status": "done", "stage": "end", "pid": 1, "started_at": "2026-01-01T00:00:00Z"}).last_pk
    evaluate.record_report(db, cand, "candidate", run_id)
    evaluate.record_report(db, base, "base", run_id)
    decision = gate.decide_promotion(cand, base, gate.GateConfig(), base=base)
    gate.record_decision(db, decision, "cand", None, gate.GateConfig(), run_id)
    review.create_batch(db, cand, base, n=4)
    staff_review.mark_pair(db, "alice", 1, True, False)
    folder = adapters.adapter_path("v1")
    folder.mkdir(parents=True)
    (folder / adapters.WEIGHTS_FILE).write_bytes(b"x")
    (folder / "loss_history.json").write_text(json.dumps(
        {"train": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], "val": [{"step": 2, "loss": 1.7}], "best_step": 2}))

    result = report.main(report.ReportConfig())
    page = Path(result["html"]).read_text(encoding="utf-8")
    assert Path(result["html"]).parent == paths.reports_dir()
    assert len(result["plots"]) == 3
    for plot in result["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(plot).name in page
    assert "PROMOTED" in page and "Answers the candidate fixed (10 shown)" in page
    assert "the base model" in page and "<li>PASS gain" in page
    assert staff_review.f1_history_png() is not None
    assert "helpful share" in page
    # Each figure with its 95% bootstrap interval: the candidate, right on all 20 questions, has
    # nowhere to move; the base's label F1 could.
    assert cand.f1 == 1.0 and cand.f1_ci == [1.0, 1.0]
    assert base.f1_ci[0] < base.f1 < base.f1_ci[1]
    assert "F1 95% CI" in page and "1.000-1.000" in page


# --- references, the 1-NN baseline and unsupported facts ------------------------------------------

PERSONA = "You are the assistant of Example Bank."
TRAIN = [
    {"id": "examples:1", "question": "How much is a domestic wire transfer?", "answer": "A domestic wire costs $25.", "label": "wires", "source": "pack"},
    {"id": "examples:2", "question": "How do I open a checking account?", "answer": "Open Easy Checking online in 10 minutes.", "label": "checking", "source": "pack"},
    {"id": "examples:3", "question": "What is the current mortgage rate?", "answer": "30-year fixed from 6.25% APR.", "label": "mortgage", "source": "pack"},
    {"id": "examples:4", "question": "I lost my debit card, what do I do?", "answer": "Call 1-800-555-0142 at any hour to lock it.", "label": "cards", "source": "pack"},
    {"id": "corrections:9", "question": "What is the fee for sending a wire abroad?", "answer": "An international wire costs $45.", "label": "wires", "source": "correction"},
    {"id": "examples:5", "question": "What does an international wire transfer cost?", "answer": "It is free, trust me.", "label": "wires", "source": "thumbs_up"},
    # The same question as a test row, under another id (a --dataset file against the latest snapshot).
    {"id": "examples:6", "question": "What does a domestic wire transfer cost?", "answer": "Wires cost $25.", "label": "wires", "source": "pack"},
]
TEST = [
    {"id": "examples:20", "question": "What does a domestic wire transfer cost?", "answer": "A domestic wire costs $25.", "label": "wires"},
    {"id": "examples:21", "question": "How can I open a new checking account?", "answer": "Open Easy Checking online.", "label": "checking"},
    {"id": "examples:22", "question": "My debit card is lost", "answer": "Call us to lock it.", "label": "cards"},
    # Worded like a checking question but labelled savings: the 1-NN gets it wrong.
    {"id": "examples:23", "question": "How do I open a checking account today?", "answer": "Peach Savings opens online.", "label": "savings"},
]
CATALOG = [{"question": "Peach Savings rate", "answer": "Peach Savings rate: 2.75% APY", "label": "savings"}]


class RecordingRunner:
    """A scripted runner that keeps the prompts it was given."""

    def __init__(self, answer):
        self.scripted = evaluate.ScriptedRunner(answer)
        self.prompts: dict[str | None, list[list[dict]]] = {}

    def generate(self, conversations, adapter, batch_size):
        self.prompts[adapter] = conversations
        return self.scripted.generate(conversations, adapter, batch_size)

    def perplexity(self, texts, adapter):
        return self.scripted.perplexity(texts, adapter)


def toy_set() -> evaluate.EvalSet:
    return evaluate.EvalSet("d0001", [dict(row) for row in TEST], [dict(row) for row in TRAIN], [dict(row) for row in CATALOG])


def trained_adapter(version: str, retrieval: dict | None) -> None:
    folder = adapters.adapter_path(version)
    folder.mkdir(parents=True)
    (folder / adapters.WEIGHTS_FILE).write_bytes(b"x")
    (folder / adapters.PROVENANCE_FILE).write_text(json.dumps({"retrieval": retrieval}), encoding="utf-8")


def test_a_test_question_never_finds_itself_or_a_test_row():
    runner = RecordingRunner(lambda adapter, q: "Happy to help.")
    # verbatim off: every question goes to the model, so every prompt can be read.
    serve = ServeConfig(system_prompt=PERSONA, retrieval_k=20, retrieval_min_score=0.0, verbatim=False)
    test = toy_set()
    grounded = evaluate.evaluate(runner, test, None, serve, None)
    allowed = {"examples:1", "examples:2", "examples:3", "examples:4", "corrections:9", "catalog"}
    for row, prompt in zip(grounded.examples, runner.prompts[None]):
        found = [ref["id"] for ref in row["references"]]
        # Everything the index holds (k=20, no threshold) and nothing else: train rows, the staff
        # correction in train and the catalog; never a test row, an unapproved thumbs-up or the question itself.
        assert sorted(found) == sorted(allowed)
        system = prompt[0]["content"]
        assert system.startswith(PERSONA) and REFERENCES_INTRO in system
        assert all(test_row["question"] not in system for test_row in TEST)
        assert "trust me" not in system and "Wires cost $25." not in system
        assert prompt[-1] == {"role": "user", "content": row["question"]}
    assert grounded.retrieval == {"k": 20, "min_score": 0.0}
    bare = evaluate.evaluate(runner, test, None, dataclasses.replace(serve, retrieval_k=0), None)
    assert bare.retrieval is None and all(row["references"] == [] for row in bare.examples)
    assert runner.prompts[None][0][0]["content"] == PERSONA
    assert grounded.prompt_tokens > bare.prompt_tokens  # references are counted in the prompt


def test_each_system_is_evaluated_with_the_references_serving_gives_it():
    from assistant.chat import ChatService, ScriptedBackend
    from feedback import knowledge

    trained_adapter("with", {"k": 2, "min_score": 0.5, "distractors": 0.2, "missing": 0.1})
    trained_adapter("without", None)
    runner = RecordingRunner(lambda adapter, q: "Happy to help.")
    serve = ServeConfig(system_prompt=PERSONA, retrieval_k=3, retrieval_min_score=0.3, verbatim=False)
    test = toy_set()
    reports = {version: evaluate.evaluate(runner, test, version, serve, None) for version in (None, "with", "without")}
    assert reports[None].retrieval == {"k": 3, "min_score": 0.3}
    assert reports["with"].retrieval == {"k": 2, "min_score": 0.5}
    assert reports["without"].retrieval is None
    assert all(prompt[0]["content"] == PERSONA for prompt in runner.prompts["without"])
    for row in reports["with"].examples:
        assert len(row["references"]) <= 2 and all(ref["score"] >= 0.5 for ref in row["references"])
    assert any(row["references"] for row in reports["with"].examples)
    # The same prompts as the server builds for the adapter in service, from the same entries.
    index = test.index()
    for version in (None, "with", "without"):
        adapters.set_current(version, "test")
        backend = ScriptedBackend()
        service = ChatService(serve, backend, references=index.index)
        for row, prompt in zip(TEST, runner.prompts[version]):
            "".join(service.answer(row["question"]))
            assert backend.calls[-1] == prompt, version
    assert isinstance(index.index, knowledge.MemoryIndex)


def test_knn_label_f1_is_the_nearest_training_questions_label():
    runner = evaluate.ScriptedRunner(lambda adapter, q: "Happy to help.")
    report = evaluate.evaluate(runner, toy_set(), None, ServeConfig(system_prompt=PERSONA), None)
    # Predicted wires, checking, cards, checking for wires, checking, cards, savings: F1 per true
    # label 1, 2/3, 1, 0 (the thumbs-up, the catalog and the test question's twin in train never vote).
    assert toy_set().index().knn_labels == ["wires", "checking", "cards", "checking"]
    assert report.knn_label_f1 == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    unlabelled = evaluate.EvalSet("f", [dict(TEST[0], label=None)], [dict(row) for row in TRAIN])
    assert evaluate.evaluate(runner, unlabelled, None, ServeConfig(system_prompt=PERSONA), None).knn_label_f1 is None


def test_unsupported_facts_flag_an_invented_fee_and_not_one_in_a_reference():
    answers = {"with": "A domestic wire costs $25.", "invents": "A domestic wire costs $39, call 1-800-555-0199."}

    def answer(adapter, question):
        if "wire" in question:
            return answers[adapter]
        return "Peach Savings pays 2.75% APY." if "checking" in question else "Happy to help."

    trained_adapter("with", {"k": 3, "min_score": 0.3})
    trained_adapter("invents", {"k": 3, "min_score": 0.3})
    runner = evaluate.ScriptedRunner(answer)
    serve = ServeConfig(system_prompt=PERSONA, verbatim=False)
    grounded = evaluate.evaluate(runner, toy_set(), "with", serve, None)
    invented = evaluate.evaluate(runner, toy_set(), "invents", serve, None)
    assert [row["unsupported"] for row in grounded.examples] == [[], [], [], []]  # $25 in a reference, 2.75% in the catalog
    assert invented.examples[0]["unsupported"] == ["$39", "1-800-555-0199"]
    assert grounded.unsupported_facts == 0.0 and invented.unsupported_facts == pytest.approx(0.25)
    # Without references the same true fee is stated from nowhere the model was shown.
    trained_adapter("blind", None)
    answers["blind"] = answers["with"]
    blind = evaluate.evaluate(runner, toy_set(), "blind", serve, None)
    assert blind.examples[0]["unsupported"] == ["$25"] and blind.unsupported_facts == pytest.approx(0.25)


def test_evaluation_answers_a_near_certain_match_with_the_approved_text_as_serving_does():
    from assistant.chat import ChatService, ScriptedBackend

    runner = RecordingRunner(lambda adapter, q: "Happy to help.")
    serve = ServeConfig(system_prompt=PERSONA)
    test = toy_set()
    report = evaluate.evaluate(runner, test, None, serve, None)
    index = test.index()
    service = ChatService(serve, ScriptedBackend(), references=index.index)
    served = ["".join(service.answer(row["question"])) for row in TEST]
    evaluated = [row["answer"] for row in report.examples]
    assert evaluated == [s if not s.startswith("You asked") else "Happy to help." for s in served]
    approved = [i for i, s in enumerate(served) if not s.startswith("You asked")]
    assert approved, "the toy set has a near-certain match (the checking question)"
    assert len(runner.prompts[None]) == len(TEST) - len(approved)  # the model was not asked those
