"""Replay of base-model text: sampled once and cached, extended deterministically, encoded like the
forgetting check, mixed into training and recorded. (What it does to forgetting is measured on the
real model by benchmarks/pack_result.py; a random tiny model has nothing to forget.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from assistant import model as base_models
from tests.test_trainer import tiny_cfg, tokenizer_of, write_snapshot
from trainer import replay
from trainer.train import main


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(replay, "SAMPLE_TOKENS", 16)  # short samples: the tests are about counts and caching
    yield
    torch.set_num_threads(threads)


def test_samples_are_cached_and_extended_without_changing_the_first_ones(tiny_model_dir, monkeypatch):
    info = base_models.prepare(str(tiny_model_dir))
    first = replay.base_samples(info, 40, "cpu", seed=3)
    file = replay.cache_file(info, 3)
    assert len(first) == 40 and all(isinstance(t, str) for t in first)
    assert len(file.read_text().splitlines()) == 2 * replay.CHUNK  # whole chunks are kept
    assert len(set(first)) > 30, "samples should differ from each other"

    def no_model(*args, **kwargs):
        raise AssertionError("the cache holds enough samples; the model must not load")

    with monkeypatch.context() as patched:
        patched.setattr(base_models, "load_base", no_model)
        assert replay.base_samples(info, 64, "cpu", seed=3) == replay._read(file)[:64]
        assert replay.base_samples(info, 40, "cpu", seed=3) == first
    more = replay.base_samples(info, 70, "cpu", seed=3)
    assert more[:40] == first and len(more) == 70
    assert replay.base_samples(info, 5, "cpu", seed=4) != first[:5], "another seed draws other samples"


def test_a_cache_cut_short_keeps_whole_chunks_so_later_samples_stay_the_same(tiny_model_dir):
    info = base_models.prepare(str(tiny_model_dir))
    full = replay.base_samples(info, 2 * replay.CHUNK, "cpu")
    file = replay.cache_file(info, 0)
    lines = file.read_text().splitlines()
    file.write_text("\n".join(lines[: replay.CHUNK + 5]) + "\n")
    assert replay.base_samples(info, 2 * replay.CHUNK, "cpu") == full


def test_replay_rows_are_plain_text_with_the_loss_on_every_token(tiny_model_dir):
    tokenizer = tokenizer_of(tiny_model_dir)
    rows = replay.encode_texts(tokenizer, ["The river floods every spring.", "", "x" * 4000], max_length=64)
    assert len(rows) == 2  # the empty text predicts nothing
    assert rows[0]["input_ids"] == tokenizer("The river floods every spring.")["input_ids"] == rows[0]["labels"]
    assert len(rows[1]["input_ids"]) == 64 and rows[1]["attention_mask"] == [1] * 64


def test_training_with_replay_mixes_in_the_rows_and_records_them(tiny_model_dir):
    write_snapshot(16, 4)
    plain = main(tiny_cfg(tiny_model_dir, replay=0.0))
    mixed = main(tiny_cfg(tiny_model_dir, replay=0.5))
    assert plain.replay_examples == 0 and mixed.replay_examples == 8
    assert (plain.steps, mixed.steps) == (4, 6)  # batches of 4: 16 rows, then 16 + 8
    assert mixed.train_examples == 16
    provenance = json.loads((Path(mixed.path) / "provenance.json").read_text())
    assert provenance["train_config"]["replay"] == 0.5
    assert provenance["replay"]["examples"] == 8 and Path(provenance["replay"]["file"]).is_file()
    assert json.loads((Path(plain.path) / "provenance.json").read_text())["replay"]["file"] is None
