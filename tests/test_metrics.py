"""Evaluation metrics and the answer labeler: known values, bootstrap behaviour, save/load, Bitext."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest

from evals.labeler import AnswerLabeler, prepare_text
from evals.metrics import (
    answer_f1,
    bleu,
    bootstrap_gain,
    bootstrap_interval,
    exact_match,
    label_scores,
    macro_f1,
    mean_score,
    normalize_answer,
    perplexity,
    rouge_l,
)


def test_normalize_answer_squad_rules():
    assert normalize_answer("  The Card, an   ATM and a PIN!  ") == "card atm and pin"
    assert normalize_answer("theory") == "theory"  # "the" only as a whole word


def test_answer_f1_known_values():
    assert answer_f1("Your card arrives in 3 days.", "your card arrives in 3 days") == 1.0
    assert answer_f1("call us", "visit the branch") == 0.0
    # 2 shared tokens (card, arrives); precision 2/3, recall 2/4 -> F1 = 4/7.
    assert answer_f1("card arrives tomorrow", "the card arrives in days") == pytest.approx(4 / 7)
    assert answer_f1("", "") == 1.0
    assert answer_f1("", "something") == 0.0


def test_exact_match_ignores_case_articles_punctuation():
    assert exact_match("The PIN.", "pin") == 1.0
    assert exact_match("pin", "pins") == 0.0


def test_rouge_and_bleu_identical_versus_different():
    refs = ["your card will arrive within five working days", "you can reset your pin at any atm"]
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    assert bleu(refs, refs) == pytest.approx(1.0)
    others = ["please contact our branch for details today", "the weather is lovely outside"]
    assert rouge_l(others, refs) < 0.3
    assert bleu(others, refs) < 0.1
    with pytest.raises(ValueError):
        rouge_l(refs, refs[:1])


def test_label_scores_against_hand_computed_values():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    # a: P 2/2 R 2/3 F 0.8 | b: P 1/2 R 1/2 F 0.5 | c: P 1/2 R 1/1 F 2/3
    scores = label_scores(y_true, y_pred)
    assert scores["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert scores["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert scores["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["per_label"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert scores["confusions"] == [
        {"true": "a", "predicted": "b", "count": 1},
        {"true": "b", "predicted": "c", "count": 1},
    ]
    assert macro_f1(y_true, y_pred) == pytest.approx(scores["f1"])


def test_label_scores_abstention_is_a_miss_not_a_column():
    scores = label_scores(["a", "b"], ["a", "unknown"])
    assert set(scores["per_label"]) == {"a", "b"}
    assert scores["f1"] == pytest.approx(0.5)  # a: 1.0, b: 0.0


def test_macro_f1_matches_scikit_learn_on_random_labels():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    y_true = rng.choice(list("abcdefg"), 300)
    y_pred = np.where(rng.random(300) < 0.5, y_true, rng.choice(list("abcdefgh"), 300))
    expected = f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)


def _labels(rng, truth, accuracy, names):
    return np.where(rng.random(len(truth)) < accuracy, truth, rng.choice(names, len(truth)))


def test_bootstrap_clear_gain_is_significant_and_fast():
    rng = np.random.default_rng(0)
    names = [f"intent_{i}" for i in range(20)]
    truth = rng.choice(names, 200)
    weak, strong = _labels(rng, truth, 0.5, names), _labels(rng, truth, 0.9, names)
    start = time.perf_counter()
    result = bootstrap_gain(macro_f1, truth, weak, strong, n=1000, seed=0)
    assert time.perf_counter() - start < 2.0
    assert result["delta"] > 0.2
    assert result["p_not_better"] < 0.01
    assert 0 < result["ci_low"] < result["delta"] < result["ci_high"]
    # The reverse comparison is clearly not a gain.
    assert bootstrap_gain(macro_f1, truth, strong, weak, n=200)["p_not_better"] > 0.99


def test_bootstrap_identical_systems_never_better():
    rng = np.random.default_rng(1)
    truth = rng.choice(list("abc"), 50)
    pred = _labels(rng, truth, 0.7, list("abc"))
    result = bootstrap_gain(macro_f1, truth, pred, pred.copy(), n=300)
    assert result["delta"] == 0.0
    assert result["p_not_better"] == 1.0
    assert result["ci_low"] == result["ci_high"] == 0.0


def test_bootstrap_on_per_example_answer_f1():
    references = ["your card arrives in five days", "reset the pin at an atm", "call us on the phone"] * 20
    worse = ["card arrives soon", "visit a branch", "call us"] * 20
    better = ["your card arrives in five days", "reset pin at atm", "call us on the phone"] * 20
    f1_a = [answer_f1(p, r) for p, r in zip(worse, references)]
    f1_b = [answer_f1(p, r) for p, r in zip(better, references)]
    result = bootstrap_gain(mean_score, None, f1_a, f1_b, n=500)
    assert result["delta"] == pytest.approx(np.mean(f1_b) - np.mean(f1_a))
    assert result["p_not_better"] == 0.0
    with pytest.raises(ValueError):
        bootstrap_gain(mean_score, None, f1_a, f1_b[:-1])


def test_bootstrap_interval_brackets_the_score_and_narrows_with_more_examples():
    rng = np.random.default_rng(2)
    names = [f"l{i}" for i in range(8)]
    widths = {}
    for size in (115, 1000):
        truth = rng.choice(names, size)
        pred = _labels(rng, truth, 0.85, names)
        result = bootstrap_interval(macro_f1, truth, pred, n=500, seed=0)
        assert result["score"] == pytest.approx(label_scores(list(truth), list(pred))["f1"])
        assert result["ci_low"] < result["score"] < result["ci_high"]
        assert result["n_resamples"] == 500
        widths[size] = result["ci_high"] - result["ci_low"]
        # The same seed gives the same interval; a narrower level a narrower one.
        assert bootstrap_interval(macro_f1, truth, pred, n=500, seed=0) == result
        narrow = bootstrap_interval(macro_f1, truth, pred, n=500, seed=0, level=0.5)
        assert result["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < result["ci_high"]
    # About 1/sqrt(n): 115 questions give an interval about three times as wide as 1,000.
    assert 2.0 < widths[115] / widths[1000] < 4.5
    # A system right on every example has nowhere to move.
    truth = rng.choice(names, 40)
    assert bootstrap_interval(macro_f1, truth, truth.copy(), n=100)["ci_low"] == 1.0


def test_bootstrap_interval_on_answer_f1_and_bad_input():
    scores = [0.0, 1.0] * 30
    result = bootstrap_interval(mean_score, None, scores, n=400)
    assert result["score"] == 0.5 and result["ci_low"] < 0.5 < result["ci_high"]
    for args, message in (
        ((mean_score, None, []), "empty"),
        ((macro_f1, ["a", "b"], ["a"]), "align"),
    ):
        with pytest.raises(ValueError, match=message):
            bootstrap_interval(*args)
    with pytest.raises(ValueError, match="n must be"):
        bootstrap_interval(mean_score, None, scores, n=0)
    with pytest.raises(ValueError, match="level must be"):
        bootstrap_interval(mean_score, None, scores, level=1.0)


def test_perplexity_of_tiny_llama_is_finite_and_above_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model.train()
    texts = ["How do I reset my PIN?", "Your card will arrive within five working days.", "x"]
    value = perplexity(model, tokenizer, texts, max_length=16)
    assert math.isfinite(value) and value > 1.0
    # A random model is close to uniform over the vocabulary: far above a trained model, at most
    # a few times the vocabulary size.
    assert value < 5 * len(tokenizer)
    assert model.training, "perplexity must restore the caller's train/eval mode"
    assert perplexity(model, tokenizer, texts, max_length=16) == pytest.approx(value)
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, [""], max_length=16)


SYNTHETIC = {
    "card_arrival": [
        "Your new card is on its way and should arrive within five working days.",
        "Cards are posted by mail and usually reach you in about a week.",
        "If your card has not arrived after two weeks, we can send a replacement.",
    ],
    "reset_pin": [
        "You can change your PIN at any of our ATMs using your current PIN.",
        "To reset a forgotten PIN, open the app and choose Security, then PIN.",
        "A new PIN can be set at a cash machine in a few seconds.",
    ],
    "exchange_rate": [
        "We use the interbank exchange rate with a small margin for currency conversion.",
        "Foreign currency payments are converted at the daily exchange rate.",
        "The rate for converting euros to dollars is shown before you confirm.",
    ],
}


@pytest.fixture(scope="module")
def synthetic_labeler() -> AnswerLabeler:
    texts = [text for answers in SYNTHETIC.values() for text in answers]
    labels = [label for label, answers in SYNTHETIC.items() for _ in answers]
    return AnswerLabeler().fit(texts, labels, aliases={label: [label.replace("_", " ")] for label in SYNTHETIC})


def test_labeler_on_tiny_synthetic_set(synthetic_labeler):
    unseen = [
        "The card should be delivered to your address in a few days.",
        "Pick a new PIN at the ATM.",
        "Currency conversion happens at the current exchange rate.",
    ]
    assert synthetic_labeler.predict(unseen) == ["card_arrival", "reset_pin", "exchange_rate"]
    assert synthetic_labeler.classes == sorted(SYNTHETIC)
    assert synthetic_labeler.predict([]) == []


def test_labeler_save_load_round_trip(synthetic_labeler, tmp_path):
    folder = synthetic_labeler.save(tmp_path / "labeler")
    assert sorted(p.name for p in folder.iterdir()) == ["labeler.json", "labeler.npz"]
    loaded = AnswerLabeler.load(folder)
    texts = ["where is my card", "pin change", "euro to dollar rate", "something unrelated entirely"]
    assert loaded.predict(texts) == synthetic_labeler.predict(texts)
    np.testing.assert_allclose(loaded.predict_proba(texts), synthetic_labeler.predict_proba(texts), rtol=1e-6)


def test_labeler_refuses_unfitted_and_single_label():
    with pytest.raises(RuntimeError, match="not fitted"):
        AnswerLabeler().predict(["hello"])
    with pytest.raises(ValueError, match="two distinct labels"):
        AnswerLabeler().fit(["a", "b"], ["x", "x"])


def test_prepare_text_keeps_placeholder_words():
    assert prepare_text("Call {{Customer Support Phone Number}} or  visit {{ Website URL }}.") == (
        "Call Customer Support Phone Number or visit Website URL."
    )


@pytest.mark.slow
def test_labeler_recovers_bitext_intent_from_reference_answers(shared_data):
    """Product bar: label F1 of generated answers is only meaningful if references score >= 0.95."""
    from sklearn.model_selection import train_test_split

    path = shared_data / "bitext" / "bitext_customer_support.csv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train, test = train_test_split(rows, test_size=0.2, stratify=[r["intent"] for r in rows], random_state=0)
    labeler = AnswerLabeler().fit([r["response"] for r in train], [r["intent"] for r in train])
    scores = label_scores([r["intent"] for r in test], labeler.predict([r["response"] for r in test]))
    assert len(scores["per_label"]) == 27
    assert scores["f1"] >= 0.95, scores["confusions"]


def test_facts_are_found_and_normalised():
    from evals.metrics import extract_facts

    def facts(text):
        return [(fact.kind, fact.value) for fact in extract_facts(text)]

    assert facts("$25") == facts("25 dollars") == facts("USD 25") == [("amount", "25")]
    assert facts("$1,000.00") == facts("$1000") == facts("1k dollars") == [("amount", "1000")]
    assert facts("$10k or 10 grand") == [("amount", "10000"), ("amount", "10000")]
    assert facts("from 6.25% APR, or 6.25 percent") == [("percent", "6.25"), ("percent", "6.25")]
    assert facts("Call 1-800-555-0142 or (800) 555-0142.") == [("phone", "8005550142"), ("phone", "8005550142")]
    assert facts("Write help@Peach.example or see https://www.PeachStateBank.example/wires/.") == [
        ("email", "help@peach.example"), ("url", "peachstatebank.example/wires")]
    assert facts("peachstatebank.example") == [("url", "peachstatebank.example")]
    # A list's numbering, a missing space after a full stop and "e.g." are no facts; plain numbers are.
    assert facts("1. Open the app.Then tap Send, e.g. within 3 business days") == [("number", "3")]
    assert facts("Worth 300 thousand") == [("number", "300000")]


def test_unsupported_facts_need_a_source_of_the_same_kind():
    from evals.metrics import facts_in, unsupported_facts

    support = facts_in(["A domestic wire costs 25 dollars.", "Call 1-800-555-0142.", "Savings: 2.75% APY",
                        "Cards arrive in seven business days."])

    def unsupported(answer):
        return [fact.text for fact in unsupported_facts(answer, support)]

    assert unsupported("A wire is $25.00, call 555-0142 or 1 (800) 555-0142.") == []
    assert unsupported("The fee is $39; call 1-888-555-0142 or mail fees@peach.example") == [
        "$39", "1-888-555-0142", "fees@peach.example"]
    assert unsupported("It takes 7 days and 25 minutes") == []  # a bare number matches any kind; words count
    assert unsupported("It pays 25%") == ["25%"]  # an amount does not support a percentage
    assert unsupported("No fees at all.") == []
