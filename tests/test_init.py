"""`tuneloop init`: a fresh home gets the model, the pack's >= 1,000 examples, its persona and a first
dataset version; a second run changes nothing."""

from __future__ import annotations

import json

import pytest

from tuneloop import cli
from assistant.config import ServeConfig, load
from feedback import packs
from feedback.datasets import latest_snapshot, load_split


def test_init_is_idempotent_and_gives_the_pack(tiny_model_dir, tuneloop_home, monkeypatch, capsys):
    monkeypatch.setenv("TUNELOOP_SERVE_BASE_MODEL", str(tiny_model_dir))
    assert cli.main(["init", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["imported"] >= 1000
    assert sum(first["examples"].values()) >= 1000
    assert first["examples"]["test"] >= 100 and first["dataset"] == "d0001"
    snapshot = latest_snapshot()
    test_rows = load_split(snapshot, "test")
    assert all(row["label"] for row in test_rows)

    cfg = load(ServeConfig, "serve")
    assert cfg.system_prompt == packs.load_pack().persona
    assert cfg.title == "Peach State Bank assistant"

    assert cli.main(["init", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["imported"] == 0 and second["skipped_duplicates"] == first["imported"]
    assert second["dataset_unchanged"] and second["dataset"] == "d0001"
    assert not second["persona_installed"]


def test_persona_does_not_override_a_configured_prompt(tuneloop_home):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    (tuneloop_home / "config.toml").write_text('[serve]\nport = 9000\nsystem_prompt = "Mine."\n')
    assert packs.install_persona(packs.load_pack()) is True  # the title is still added
    cfg = load(ServeConfig, "serve")
    assert (cfg.system_prompt, cfg.port, cfg.title) == ("Mine.", 9000, "Peach State Bank assistant")
    assert packs.install_persona(packs.load_pack()) is False


def test_unknown_pack_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="peach_state_bank"):
        packs.load_pack("no_such_pack")
