"""Replay of base-model text: sampled once and cached, extended deterministically, encoded like the
forgetting check, mixed into training and recorded. (What it does to forgetting is measured on the
real model by benchmarks/pack_result.py; a random tiny model has nothing to forget.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from assistant import model as base_models
from tests.test_trainer import lora_trainer, tiny_cfg, tokenizer_of, write_snapshot
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


def test_distilled_replay_rows_cost_nothing_while_the_adapter_is_the_identity(tiny_model_dir):
    from tests.test_trainer import encoded
    from trainer import data

    tokenizer, model, trainer = lora_trainer(tiny_model_dir)
    domain = encoded(tiny_model_dir, 2)
    texts = replay.encode_texts(tokenizer, ["The river floods every spring.", "Bread rises in a warm kitchen."], 64, distil=True)
    assert all(row["distil"] == 1 for row in texts)
    collate = data.PadCollator(tokenizer.pad_token_id, share_prefix=True)
    mixed = collate(domain + texts)
    assert mixed["distil"].tolist() == [0, 0, 1, 1] and "prefix_ids" not in mixed
    assert "distil" not in collate(domain), "batches without replay rows stay as they were"

    def tokens(rows):
        return sum(sum(label != data.IGNORE for label in row["labels"][1:]) for row in rows)

    # A fresh LoRA adapter (B = 0) is the base itself: the KL term is zero, the domain rows' mean
    # cross-entropy is spread over all the batch's tokens.
    domain_only = trainer.compute_loss(model, collate(domain)).item()
    both = trainer.compute_loss(model, mixed).item()
    assert both == pytest.approx(domain_only * tokens(domain) / tokens(domain + texts), rel=1e-5)


def test_distilled_replay_loss_is_the_kl_from_the_base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from trainer import data

    tokenizer, model, trainer = lora_trainer(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # an adapter that has moved away from the base
    rows = replay.encode_texts(tokenizer, ["The river floods every spring.", "Bread rises in a warm kitchen today."], 64, distil=True)
    batch = data.PadCollator(tokenizer.pad_token_id)(rows)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()

    # The same KL from a separately loaded base and the adapted model's own logits.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        q = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    counted = batch["labels"][:, 1:] != data.IGNORE
    expected = ((p.exp() * (p - q)).sum(-1) * counted).sum() / counted.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() > 1e-4, "the perturbed adapter should differ from the base"
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_training_with_distilled_replay_records_how_replay_was_learnt(tiny_model_dir):
    write_snapshot(16, 4)
    result = main(tiny_cfg(tiny_model_dir, replay=0.5))
    assert result.replay_examples == 8 and result.steps == 6
    provenance = json.loads((Path(result.path) / "provenance.json").read_text())
    assert provenance["train_config"]["replay_loss"] == "kl"  # "auto" resolved for LoRA/QLoRA
    assert math.isfinite(result.train_loss) and result.val_loss < result.base_val_loss
