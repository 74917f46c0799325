"""The Peach State Bank demo pack: file shape, label balance, grounded answers, reproducible build."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1] / "assistant" / "packs" / "peach_state_bank"
OUT_OF_SCOPE = "out_of_scope"
PHONE = "1-800-555-0142"


@pytest.fixture(scope="module")
def pack() -> dict:
    return json.loads((PACK / "pack.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    catalog = json.loads((PACK / "catalog.json").read_text(encoding="utf-8"))
    return {product["label"]: product["name"] for product in catalog}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = (PACK / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _words_only(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_pack_json_names_files_that_exist(pack):
    assert pack["name"] == "peach_state_bank"
    assert pack["title"] == "Peach State Bank"
    assert pack["license"] == "Apache-2.0 (written for tuneloop)"
    assert pack["description"]
    assert set(pack["files"]) == {"catalog", "qa", "general", "persona"}
    for filename in pack["files"].values():
        assert (PACK / filename).is_file(), filename


def test_catalog_products_are_complete_and_distinct():
    catalog = json.loads((PACK / "catalog.json").read_text(encoding="utf-8"))
    assert 14 <= len(catalog) <= 18
    for product in catalog:
        assert set(product) == {"label", "name", "summary", "facts"}
        assert re.fullmatch(r"[a-z][a-z0-9_]*", product["label"])
        assert product["summary"] and len(product["facts"]) >= 5
    labels = [product["label"] for product in catalog]
    product_names = [product["name"].lower() for product in catalog]
    assert len(set(labels)) == len(labels) and OUT_OF_SCOPE not in labels
    # Evaluation reads the product back from the answer text, so no name may hide inside another.
    for name in product_names:
        assert [other for other in product_names if name in other] == [name]


def test_qa_has_enough_complete_rows(rows, names):
    assert len(rows) >= 1000
    for row in rows:
        assert set(row) == {"question", "answer", "label"}
        assert row["question"].strip() and row["answer"].strip()
        assert row["label"] in names or row["label"] == OUT_OF_SCOPE, row


def test_labels_are_balanced(rows, names):
    counts = Counter(row["label"] for row in rows)
    assert counts[OUT_OF_SCOPE] / len(rows) >= 0.10
    for label in [*names, OUT_OF_SCOPE]:
        assert counts[label] >= 50, (label, counts[label])


def test_questions_are_unique(rows):
    by_spacing_and_case = Counter(" ".join(row["question"].lower().split()) for row in rows)
    assert [q for q, n in by_spacing_and_case.items() if n > 1] == []
    # Also unique once punctuation is dropped, so no row is a copy with a different "?".
    by_words = Counter(_words_only(row["question"]) for row in rows)
    assert [q for q, n in by_words.items() if n > 1] == []


def test_in_scope_answers_name_their_product_and_no_other(rows, names):
    for row in rows:
        if row["label"] == OUT_OF_SCOPE:
            continue
        answer = row["answer"].lower()
        assert names[row["label"]].lower() in answer, row
        others = [name for label, name in names.items() if label != row["label"] and name.lower() in answer]
        assert others == [], row


def test_out_of_scope_answers_decline_and_hand_off(rows, names):
    for row in rows:
        if row["label"] != OUT_OF_SCOPE:
            continue
        assert "Peach State Bank" in row["answer"] and PHONE in row["answer"], row
        assert not any(name.lower() in row["answer"].lower() for name in names.values()), row


def test_answers_are_short(rows):
    # Training runs on CPU, so targets stay at a few sentences.
    for row in rows:
        assert len(row["answer"].split()) <= 60, row
        assert len(re.findall(r"[.!?](?:\s|$)", row["answer"])) <= 3, row


@pytest.mark.parametrize(
    ("label", "other_word"),
    [
        ("levy_garnishment", "lien"),
        ("peach_checking", "savings"),
        ("peach_savings", "checking"),
        ("peach_debit_card", "credit"),
        ("peach_cash_back_card", "debit"),
        ("peach_pay", "wire"),
        ("wire_transfer", "app"),
        ("georgia_dream_mortgage", "equity"),
        ("home_equity_line", "mortgage"),
    ],
)
def test_confusable_questions_are_present(rows, label, other_word):
    hits = [row for row in rows if row["label"] == label and other_word in row["question"].lower()]
    assert len(hits) >= 2, (label, other_word)


def test_general_text_is_one_paragraph_per_line():
    lines = (PACK / "general.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 50
    assert all(len(line.split()) >= 15 for line in lines)
    assert len(set(lines)) == len(lines)


def test_persona_is_short_and_hands_off():
    persona = (PACK / "persona.txt").read_text(encoding="utf-8").strip()
    assert 2 <= len(re.findall(r"[.!?](?:\s|$)", persona)) <= 4
    assert "Peach State Bank" in persona and PHONE in persona


@pytest.mark.skipif(not (PACK / "build_qa.py").exists(), reason="qa.jsonl is written by hand")
def test_build_script_reproduces_qa_jsonl(tmp_path):
    spec = importlib.util.spec_from_file_location("peach_build_qa", PACK / "build_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "qa.jsonl"
    module.build(out)
    assert out.read_bytes() == (PACK / "qa.jsonl").read_bytes()
