"""`tuneloop init`: a fresh home gets the model, the pack's >= 1,000 examples, its persona and a first
dataset version; a second run changes nothing."""

from __future__ import annotations

import dataclasses
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


USER_CONFIG = """\
# tuneloop settings for the branch office
[serve] # note: staff port below
port = 9000  # behind the proxy

# nightly recipe
[train]
epochs = 2.0
"""


def test_init_installs_the_persona_around_the_users_comments_and_tables(tiny_model_dir, tuneloop_home, monkeypatch,
                                                                         capsys):
    """A ``[serve] # note`` header once crashed init (the file was split on "[serve]\\n")."""
    monkeypatch.setenv("TUNELOOP_SERVE_BASE_MODEL", str(tiny_model_dir))
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    file = tuneloop_home / "config.toml"
    file.write_text(USER_CONFIG)
    assert cli.main(["init", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["persona_installed"]
    persona, chat = json.dumps(packs.load_pack().persona), packs.load_pack().chat
    chat_lines = (f"welcome = {json.dumps(chat['welcome'])}\ndisclaimer = {json.dumps(chat['disclaimer'])}\n"
                  f"examples = {json.dumps(' | '.join(chat['examples']))}\n")
    # Sized from the pack's answers in the base model's tokens (feedback.packs.answer_token_budget).
    chat_lines += f"max_new_tokens = {packs.answer_token_budget(packs.load_pack(), cli._token_counter(str(tiny_model_dir)))}\n"
    # The settings go after the user's last [serve] setting; the comment about [train] stays with it.
    assert file.read_text() == USER_CONFIG.replace(
        "port = 9000  # behind the proxy\n",
        f'port = 9000  # behind the proxy\nsystem_prompt = {persona}\ntitle = "Peach State Bank assistant"\n{chat_lines}',
    )
    cfg = load(ServeConfig, "serve")
    assert (cfg.port, cfg.system_prompt, cfg.title) == (9000, packs.load_pack().persona, "Peach State Bank assistant")

    written = file.read_text()
    assert packs.install_persona(packs.load_pack()) is False
    assert file.read_text() == written


@pytest.mark.parametrize("text", [
    "",
    "# just a comment\n",
    "[serve] # note\n",
    "[serve]\n# about serving\nport = 9000 # staff\n# last word on serving\n\n\n# the trainer\n[train] # t\nepochs = 2.0\n",
    "serve.port = 9000\n[gate]\n",
    "[serve]\nport = 9000\n[train]\nepochs = 2.0\n[serve.extra]\n",
])
def test_persona_install_keeps_every_other_line_and_quotes_any_text(text, tuneloop_home):
    import tomllib

    tuneloop_home.mkdir(parents=True, exist_ok=True)
    file = tuneloop_home / "config.toml"
    file.write_text(text)
    pack = dataclasses.replace(packs.load_pack(), persona='Say "hi" \\ then\nnew line, café ☕ # not a comment',
                               title="Ünïcode [serve]")
    assert packs.install_persona(pack) is True
    written = file.read_text()
    serve = tomllib.loads(written)["serve"]
    assert (serve["system_prompt"], serve["title"]) == (pack.persona, "Ünïcode [serve] assistant")
    before, after = tomllib.loads(text), tomllib.loads(written)
    installed = ("system_prompt", "title", "welcome", "disclaimer", "examples")
    after["serve"] = {k: v for k, v in after["serve"].items() if k not in installed}
    assert after == before | {"serve": before.get("serve", {})}
    # Every line the user wrote is still there, comments included, in order.
    lines = iter(written.splitlines())
    assert all(line in lines for line in text.splitlines())
    assert packs.install_persona(pack) is False and file.read_text() == written


@pytest.mark.parametrize("text, message", [
    ("[serve\n", "not valid TOML"),
    ("serve = 3\n", "'serve' must be a table"),
    ("[[serve]]\nport = 1\n", "'serve' must be a table"),
])
def test_init_refuses_a_config_it_cannot_read_and_leaves_it_alone(text, message, tuneloop_home, capsys):
    tuneloop_home.mkdir(parents=True, exist_ok=True)
    (tuneloop_home / "config.toml").write_text(text)
    assert cli.main(["init"]) == 2
    assert message in capsys.readouterr().err
    assert (tuneloop_home / "config.toml").read_text() == text
