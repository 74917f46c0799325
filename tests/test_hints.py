"""Topic hints: where the hint goes, the question classifier behind it, cross-fitted training hints,
and that an adapter trained with hints is evaluated and served with them (and only it). What hints
do to label F1 is measured on the real model by benchmarks/pack_result.py --hints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant import adapters
from assistant.config import ServeConfig
from assistant.hints import TopicHints, hint_text, with_hint
from feedback.datasets import DatasetError
from tests.test_trainer import SYSTEM, TOPICS, one_thread, tiny_cfg, tokenizer_of, write_snapshot  # noqa: F401  (one_thread: autouse)
from trainer import data
from trainer.data import IGNORE
from trainer.train import main

QUESTIONS = {
    "card": ["My debit card was stolen", "How do I lock my card?", "card declined at the store", "new card PIN"],
    "mortgage": ["What are your mortgage rates?", "How much down payment for a house?", "refinance my home loan",
                 "Do I need PMI on my mortgage?"],
    "wire": ["How do I send an international wire?", "wire transfer fee", "SWIFT code for a wire",
             "When does an outgoing wire arrive?"],
}


def labelled_rows() -> list[dict]:
    return [{"id": f"{label}{i}", "question": q, "answer": f"About {label}.", "label": label}
            for label, questions in QUESTIONS.items() for i, q in enumerate(questions)]


def test_the_hint_ends_the_system_message_and_nothing_else_changes():
    messages = [{"role": "system", "content": "Persona."}, {"role": "user", "content": "Hi"}]
    hinted = with_hint(messages, hint_text(["peach_pay", "wire_transfer"]))
    assert hinted[0] == {"role": "system", "content": "Persona.\n\nTopics that may fit the customer's latest question: "
                                                      "peach pay, wire transfer."}
    assert hint_text(["wire_transfer", "peach_pay"]) == hint_text(["peach_pay", "wire_transfer"])  # no ranking to copy
    assert hinted[1:] == messages[1:] and messages[0]["content"] == "Persona."  # a copy
    assert with_hint(messages, "") is messages
    with pytest.raises(ValueError, match="system message"):
        with_hint(messages[1:], "Topics: x.")


def test_hints_name_the_likely_topics_and_travel_with_the_adapter(tmp_path):
    hints = TopicHints.fit([r["question"] for r in labelled_rows()], [r["label"] for r in labelled_rows()], k=2)
    [first] = hints.hints(["someone stole my card yesterday"])
    assert "card" in first.split(": ", 1)[1].rstrip(".").split(", ")
    assert len(first.split(": ", 1)[1].split(", ")) == 2
    [only] = TopicHints(hints.classifier, 1).hints(["someone stole my card yesterday"])
    assert only == "Topics that may fit the customer's latest question: card."
    assert hints.longest_hint() == hint_text(["mortgage", "card"])

    folder = tmp_path / "v1"
    hints.save(folder)
    loaded = adapters.load_hints(folder)
    assert loaded.k == 2 and loaded.hints(["wire to Germany", "house loan"]) == hints.hints(["wire to Germany", "house loan"])
    assert adapters.load_hints(tmp_path / "trained-without") is None
    (folder / "hints" / "labeler.npz").unlink()
    with pytest.raises(adapters.AdapterError, match="refused: the topic hints .* missing or damaged"):
        adapters.load_hints(folder)


def test_a_training_question_never_gets_its_hint_from_a_classifier_that_saw_it(monkeypatch):
    seen: list[tuple[set, list]] = []  # (questions a classifier was fitted on, questions it hinted)
    real_fit, real_hints = TopicHints.fit.__func__, TopicHints.hints

    def fit(cls, questions, labels, k):
        fitted = real_fit(cls, questions, labels, k)
        fitted.fitted_on = set(questions)
        return fitted

    def hints(self, questions):
        seen.append((self.fitted_on, list(questions)))
        return real_hints(self, questions)

    monkeypatch.setattr(TopicHints, "fit", classmethod(fit))
    monkeypatch.setattr(TopicHints, "hints", hints)
    train = labelled_rows() + [{"id": "u", "question": "Where is my card?", "answer": "Here.", "label": None}]
    val = [{"id": "v", "question": "Fees for a wire?", "answer": "$25.", "label": "wire"}]
    full, train_hints, val_hints = data.topic_hints(train, val, k=3, seed=0)

    assert full.fitted_on == {r["question"] for r in train if r["label"]}  # the adapter's classifier: all labelled rows
    assert len(train_hints) == len(train) and all(h.startswith("Topics that may fit") for h in train_hints)
    final_giver = {}  # the classifier whose hint a question keeps: the last one that hinted it
    for fitted, asked in seen:
        final_giver.update(dict.fromkeys(asked, fitted))
    assert all(r["question"] not in final_giver[r["question"]] for r in train if r["label"])
    assert final_giver["Where is my card?"] == full.fitted_on  # unlabelled: the full classifier
    assert val_hints == full.hints(["Fees for a wire?"])

    with pytest.raises(DatasetError, match="at least two labels"):
        data.topic_hints([dict(r, label=None) for r in train], val, k=3, seed=0)


def test_the_hint_is_prompt_not_loss(tiny_model_dir):
    tokenizer = tokenizer_of(tiny_model_dir)
    hint = hint_text(["card", "wire"])
    plain = data.encode_example(tokenizer, SYSTEM, "Where is my card?", "In the post.")
    hinted = data.encode_example(tokenizer, SYSTEM, "Where is my card?", "In the post.", hint)
    answer = [t for t in plain["labels"] if t != IGNORE]
    assert [t for t in hinted["labels"] if t != IGNORE] == answer
    assert hint in tokenizer.decode(hinted["input_ids"]) and len(hinted["input_ids"]) > len(plain["input_ids"])


def test_an_adapter_trained_with_hints_is_evaluated_and_served_with_them(tiny_model_dir, monkeypatch):
    from assistant.chat import ChatService, TransformersBackend
    from evals import evaluate

    write_snapshot(16, 4)
    result = main(tiny_cfg(tiny_model_dir, max_steps=2, hints=2))
    folder = Path(result.path)
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["topic_hints"] == {"k": 2, "labels": sorted(set(TOPICS))}
    assert provenance["train_config"]["hints"] == 2 and (folder / "hints" / "hints.json").is_file()

    serve = ServeConfig(base_model=str(tiny_model_dir), device="cpu", max_new_tokens=3)
    prompts: list[list[dict]] = []
    encode = TransformersBackend._encode
    monkeypatch.setattr(TransformersBackend, "_encode", lambda self, messages: prompts.append(messages) or encode(self, messages))
    backend = TransformersBackend(serve)  # the base model serves: no hints
    list(ChatService(serve, backend).answer("How do I sort out my loan?"))
    assert backend.hints is None and "Topics that may fit" not in prompts[-1][0]["content"]

    adapters.set_current(result.adapter, "test")
    stream = ChatService(serve, backend).answer("How do I sort out my loan?")
    list(stream)
    expected = adapters.load_hints(folder).hints(["How do I sort out my loan?"])[0]
    assert backend.active == result.adapter and prompts[-1][0]["content"] == f"{serve.system_prompt}\n\n{expected}"
    assert stream.stats.tokens_in == len(encode(backend, prompts[-1])["input_ids"][0])
    # The context budget counts room for the longest hint this adapter can give.
    plain = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert backend.count_tokens(plain) >= len(encode(backend, with_hint(plain, backend.hints.longest_hint()))["input_ids"][0])

    adapters.rollback("test")
    list(ChatService(serve, backend).answer("How do I sort out my loan?"))
    assert backend.hints is None and prompts[-1][0]["content"] == serve.system_prompt

    runner = evaluate.ModelRunner(serve)
    applied: list[int] = []
    apply = TopicHints.apply
    monkeypatch.setattr(TopicHints, "apply", lambda self, conversations: applied.append(len(conversations)) or apply(self, conversations))
    conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I sort out my fee?"}]] * 3
    with_adapter = runner.generate(conversations, result.adapter, batch_size=3)
    base = runner.generate(conversations, None, batch_size=3)
    assert applied == [3] and all(a.prompt_tokens > b.prompt_tokens for a, b in zip(with_adapter, base))


def test_a_dataset_without_labels_trains_without_hints_and_says_so(tiny_model_dir, caplog):
    snapshot = write_snapshot(16, 4)
    train = snapshot / "train.jsonl"
    train.write_text("".join(json.dumps(dict(json.loads(line), label=None)) + "\n" for line in train.read_text().splitlines()))
    with caplog.at_level("WARNING", logger="trainer.train"):
        result = main(tiny_cfg(tiny_model_dir, max_steps=1, hints=3))
    folder = Path(result.path)
    assert not (folder / "hints").exists() and json.loads((folder / "provenance.json").read_text())["topic_hints"] is None
    assert "topic hints are off for this adapter: the training split has 0 label(s)" in caplog.text
