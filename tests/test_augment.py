"""Noisy copies of training questions: what the noise does to a question, how many copies a run
gets, that they are reproducible, and that only the training split is copied. (What they do to
label F1 is measured on the real model by benchmarks/pack_result.py --augment.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.test_trainer import one_thread, tiny_cfg, write_snapshot  # noqa: F401  (one_thread: the trainer tests' autouse fixture)
from trainer import augment
from trainer.train import main

QUESTIONS = [
    "Who cancels the security deed?",
    "How do I open a joint account with my spouse?",
    "min deposit checking",
    "Is there a minimum balance for checking?",
    "what is gap and do i need it",
    "CD rates?",
]


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_a_noisy_copy_is_one_slip_and_or_texting_style_away_from_the_question():
    rng = random.Random(0)
    styles = set()
    for _ in range(50):
        for question in QUESTIONS:
            noisy = augment.noisy_question(question, rng)
            assert noisy != question
            plain, rough = question.lower().rstrip("?.! "), noisy.lower().rstrip("?.! ")
            words, noisy_words = plain.split(" "), rough.split(" ")
            if rough == plain + " pls":  # nothing to slip and already texting style
                styles.add("ending")
                continue
            assert len(words) == len(noisy_words)
            changed = [(w, n) for w, n in zip(words, noisy_words) if w != n]
            assert len(changed) <= 1, (question, noisy)
            for word, slipped in changed:
                assert len(word) >= 4 and word[0] == slipped[0] and word[-1] == slipped[-1]
                assert edit_distance(word, slipped) <= 2 and abs(len(word) - len(slipped)) <= 1
                styles.add("typo")
            was_typed_formally = question != question.lower() or question.endswith(("?", ".", "!"))
            if was_typed_formally and noisy == noisy.lower() and not noisy.endswith(("?", ".", "!")):
                styles.add("texting")
    assert styles == {"typo", "texting", "ending"}


def test_every_kind_of_keyboard_slip_happens_and_neighbours_are_adjacent_keys():
    assert set(augment.NEIGHBOURS["s"]) == set("adwezx") and set(augment.NEIGHBOURS["q"]) == set("wa")
    assert all(ch not in near for ch, near in augment.NEIGHBOURS.items())
    rng = random.Random(1)
    slips = {augment.keyboard_slip("security", rng) for _ in range(300)}
    assert {len(s) for s in slips} == {7, 8, 9}  # dropped, swapped or replaced, doubled
    assert any(edit_distance("security", s) == 1 and len(s) == 8 for s in slips)  # a neighbouring key
    assert all(s[0] == "s" and s[-1] == "y" for s in slips)


def test_copies_per_row_are_counted_reproducible_and_keep_answer_and_label():
    rows = [{"id": f"r{i}", "question": q, "answer": f"answer {i}", "label": f"l{i % 2}"} for i, q in enumerate(QUESTIONS * 10)]
    assert augment.augment_rows(rows, 0.0, seed=1) == []
    one = augment.augment_rows(rows, 1.0, seed=1)
    assert len(one) == len(rows)
    assert [(r["id"], r["answer"], r["label"]) for r in one] == [(r["id"], r["answer"], r["label"]) for r in rows]
    assert one == augment.augment_rows(rows, 1.0, seed=1), "same seed, same copies"
    assert one != augment.augment_rows(rows, 1.0, seed=2)
    two = augment.augment_rows(rows, 2.0, seed=1)
    assert len(two) == 2 * len(rows) and two[: len(rows)] == one
    half = augment.augment_rows(rows, 1.5, seed=1)
    assert len(rows) < len(half) < 2 * len(rows) and half[: len(rows)] == one
    assert all(rows[i]["question"] == q for i, q in enumerate(QUESTIONS * 10)), "the input rows are not changed"


def test_training_adds_noisy_copies_of_the_training_split_only(tiny_model_dir, monkeypatch):
    snapshot = write_snapshot(16, 4)
    seen = []
    real = augment.augment_rows
    monkeypatch.setattr(augment, "augment_rows", lambda rows, copies, seed: seen.append(rows) or real(rows, copies, seed))
    result = main(tiny_cfg(tiny_model_dir, augment=1.0, replay=0.5))
    train_questions = [json.loads(line)["question"] for line in (Path(snapshot) / "train.jsonl").read_text().splitlines()]
    assert [r["question"] for r in seen[0]] == train_questions
    assert result.train_examples == 32 and result.augmented_examples == 16
    assert result.replay_examples == 16, "replay keeps its share of the (augmented) training rows"
    assert result.steps == 12 and result.val_examples == 4  # batches of 4: 32 + 16 rows
    provenance = json.loads((Path(result.path) / "provenance.json").read_text())
    assert provenance["train_config"]["augment"] == 1.0 and provenance["result"]["augmented_examples"] == 16
    assert result.val_loss < result.base_val_loss


def test_augment_out_of_range_is_refused_with_what_to_change(tiny_model_dir):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="augment must be between 0"):
        tiny_cfg(tiny_model_dir, augment=-1.0)
