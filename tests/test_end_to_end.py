"""The whole loop on the real default model (slow): import a small labelled set, retrain and
promote with label F1 above the base model's; a feedback round through the running app's API
(thumbs-down and staff corrections on wrong answers) changes the served answers without a restart;
a round of deliberately wrong corrections is rejected by the gate and the current adapter stays.

This is also the harmful-correction-round test that tests/reliability/test_reliability_poisoning.py
refers to.
"""

from __future__ import annotations

import csv
import json
import random

import httpx
import pytest
from gradio_client import Client

import app
from tuneloop import cli
from tuneloop import pipeline
from assistant import adapters
from assistant.chat import ChatService, TransformersBackend
from assistant.config import ServeConfig, load
from feedback import auth, packs
from feedback.db import ThreadLocalDB, connect
from test_app import free_port
from evals.gate import GateConfig
from trainer.config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(3000), pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

LABELS = ["peach_checking", "peach_savings", "wire_transfer", "lien_release", "peach_auto_loan", "out_of_scope"]
# New questions, in none of the pack's files; each with the pack's answer for its product.
NEW_QUESTIONS = {
    "peach_checking": "My teenager wants her own spending account with a card, which everyday account fits?",
    "wire_transfer": "I have to move 20k to my cousin's bank in Lisbon by Friday, how does that work?",
    "lien_release": "Finally paid off the truck loan, when do I get the title back clean?",
    "peach_auto_loan": "Shopping for a used SUV, what rate could I get financing it with you?",
}
STAFF = ("erin", "a long staff password")


def pack_rows() -> list[dict]:
    rows = [json.loads(line) for line in packs.load_pack().qa_file.read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(rows)
    picked, per_label = [], {label: 0 for label in LABELS}
    for row in rows:
        if row["label"] in per_label and per_label[row["label"]] < 50:
            picked.append(row)
            per_label[row["label"]] += 1
    return picked


def reference_answer(label: str) -> str:
    return next(r["answer"] for r in pack_rows() if r["label"] == label)


def retrain(max_steps: int, capsys) -> dict:
    # About 30 test questions: too few for the production bootstrap bar (p_not_better <= 0.1) to
    # be met reliably by a real gain, so this test accepts p <= 0.5; min_delta and the forgetting
    # check are the defaults. tests/test_gate.py covers the bootstrap's rejection of noise.
    result = pipeline.main(
        pipeline.RetrainConfig(review_samples=0, few_shot_k=0),
        # No replay: with token replay 0.25 (the default then) night 1 scored 0.813 after 20 steps and night 2 0.720
        # after 60 on these 30 questions, and night 2 was rightly not promoted; which of two good
        # adapters wins on 30 questions is noise. This test is about the loop, not the recipe
        # (benchmarks/pack_result.py measures replay on the whole pack).
        train=TrainConfig(max_steps=max_steps, eval_steps=max(10, max_steps // 3), replay=0.0, progress=False),
        # This home has the pack's questions but not its catalog, and no references are served: every
        # figure an adapter learnt from the pack's answers is in no prompt or catalog, so the
        # invented-facts check would refuse any adapter (CI, 2026-12-05: 0.467 vs the base's 0.267,
        # with label F1 0.754 vs 0.513). tests/test_gate.py covers that check.
        gate=GateConfig(max_p_not_better=0.5, max_unsupported_rise=1.0),
    )
    with capsys.disabled():  # the figures show in every run's output, passed or not
        print("\nretrain:", json.dumps({k: result.get(k) for k in ("candidate", "promoted", "reasons", "f1", "seconds")}))
    return result


def test_the_loop_end_to_end(tuneloop_home, tmp_path, capsys, monkeypatch):
    # The loop's mechanics with adapters that must beat the plain base model: no references for the
    # base either. With them (retrieval_k = 3) the base scored label F1 0.746 on these 30 questions
    # and a 20-step adapter trained without references 0.754, rightly not promoted (gain below
    # min_delta, and more unsupported facts than the grounded base: 0.467 vs 0.367; CI, 2026-12-05).
    monkeypatch.setenv("TUNELOOP_SERVE_RETRIEVAL_K", "0")
    # And the transformers backend, on which its thresholds were set: on llama_cpp (the CPU default)
    # night 1 already scored 0.754 and night 2 0.740 on these 30 questions, a tie at this n, so the
    # "night 2 learns the corrections" step would test noise (run alone, 2026-12-05).
    monkeypatch.setenv("TUNELOOP_SERVE_BACKEND", "transformers")
    # 1. Staff import a small labelled set (the pack's persona serves as the system prompt).
    packs.install_persona(packs.load_pack())
    file = tmp_path / "examples.csv"
    with open(file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["q", "a", "product"])
        writer.writeheader()
        writer.writerows({"q": r["question"], "a": r["answer"], "product": r["label"]} for r in pack_rows())
    assert cli.main(["data", "import", str(file), "--question-col", "q", "--answer-col", "a",
                     "--label-col", "product", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == len(pack_rows())

    # 2. The first nightly run promotes an adapter that beats the generic base model.
    # A short first night, a longer second one: the second adapter also has the corrections.
    first = retrain(max_steps=20, capsys=capsys)
    assert first["promoted"], first["reasons"]
    assert first["f1"]["candidate"] > first["f1"]["base"]
    assert adapters.current_version() == first["candidate"]

    # 3. Customers chat on the running server; staff thumbs-down and correct the wrong answers.
    auth.add_staff(connect(), *STAFF)
    cfg = load(ServeConfig, "serve")
    backend = TransformersBackend(cfg)
    demo = app.build_app(ChatService(cfg, backend), ThreadLocalDB(), backend.base.model_id)
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), cfg.concurrency, block=False)
    try:
        # Staff sign in by the form (never a Gradio event); the session cookie goes with every call.
        signed_in = httpx.post(url.rstrip("/") + app.STAFF_LOGIN_PATH, data=dict(zip(("name", "password"), STAFF)),
                               timeout=60)
        assert signed_in.status_code == 303, signed_in.text
        staff = Client(url, verbose=False, download_files=False,
                       headers={"Cookie": f"{app.STAFF_COOKIE}={signed_in.cookies[app.STAFF_COOKIE]}"})

        def ask(question: str) -> tuple[int, str, str, Client]:
            # A new conversation per question: the server keeps each session's history and adds it to
            # the prompt, so before/after answers compare the adapters, not different histories.
            customer = Client(url, verbose=False, download_files=False)
            _history, _box, turn = customer.predict(question, api_name="/chat")
            row = connect().execute("select answer, adapter from turns where id = ?", [int(turn)]).fetchone()
            return int(turn), row[0], row[1], customer

        before = {}
        for label, question in NEW_QUESTIONS.items():
            turn, answer, adapter, customer = ask(question)
            assert adapter == first["candidate"]
            before[question] = answer
            customer.predict(turn, "down", "not what I asked", api_name="/vote")
            staff.predict(turn, reference_answer(label), label, api_name="/correct")

        # 4. The next run learns the corrections; the server swaps to it without a restart.
        second = retrain(max_steps=60, capsys=capsys)
        assert second["promoted"], second["reasons"]
        changed = 0
        for question in NEW_QUESTIONS.values():
            _turn, answer, adapter, _customer = ask(question)
            assert adapter == second["candidate"]
            changed += answer != before[question]
        assert changed >= 1, "the served answers did not change after the corrections were learned"

        # 5. A harmful round: a staff account "corrects" the product questions with the wrong
        # product's answers (hand-added examples, the same questions the model learned). The gate
        # rejects the candidate and the current adapter keeps serving.
        wrong = {"peach_checking": "wire_transfer", "peach_savings": "lien_release", "wire_transfer": "peach_savings",
                 "lien_release": "peach_checking", "peach_auto_loan": "out_of_scope"}
        for row in pack_rows():
            if row["label"] in wrong:
                staff.predict(row["question"], reference_answer(wrong[row["label"]]), wrong[row["label"]],
                              api_name="/add_example")
        third = retrain(max_steps=60, capsys=capsys)
        assert not third["promoted"], third["reasons"]
        assert adapters.current_version() == second["candidate"]
        assert ask(next(iter(NEW_QUESTIONS.values())))[2] == second["candidate"]
    finally:
        demo.close()
