"""Issue 32, backups: `tuneloop backup` taken while the real server answers restores into an empty
home holding every acknowledged turn and vote, the server starts on it, and a damaged backup is
refused (real SQLite, real Gradio server on 127.0.0.1)."""

from __future__ import annotations

import sqlite3
import threading

import httpx
import pytest

import app
from assistant import adapters, paths
from feedback import backup
from test_app import ask, fake_adapter, serve_scripted
from tuneloop import cli

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _rows(sql: str) -> list[tuple]:
    with sqlite3.connect(paths.feedback_db()) as conn:
        return conn.execute(sql).fetchall()


def test_a_backup_taken_under_load_restores_and_serves(tuneloop_home, tmp_path, monkeypatch, capsys):
    fake_adapter("v1")
    adapters.set_current("v1", "test")
    paths.config_file().write_text('[serve]\ntitle = "Backed up"\n', encoding="utf-8")
    dest = tmp_path / "backup"
    with serve_scripted() as served:
        acknowledged, stop = [], threading.Event()

        def customer():
            client = served.client()
            while not stop.is_set():
                turn_id = ask(client, "how do I open an account?")
                client.predict(turn_id, "down", "too short", api_name="/vote")
                acknowledged.append(turn_id)

        load = [threading.Thread(target=customer) for _ in range(3)]
        for thread in load:
            thread.start()
        while len(acknowledged) < 6:
            threading.Event().wait(0.05)
        before = list(acknowledged)
        assert cli.main(["backup", str(dest)]) == 0
        stop.set()
        for thread in load:
            thread.join()
    assert '"files"' in capsys.readouterr().out

    restored_home = tmp_path / "restored"
    monkeypatch.setenv("TUNELOOP_HOME", str(restored_home))
    assert cli.main(["restore", str(dest)]) == 0
    turns = {row[0]: row[1] for row in _rows("SELECT id, status FROM turns")}
    voted = {row[0] for row in _rows("SELECT turn_id FROM votes")}
    assert all(turns.get(t) == "complete" and t in voted for t in before)
    assert adapters.current_version() == "v1"
    assert 'title = "Backed up"' in paths.config_file().read_text(encoding="utf-8")
    assert _rows("PRAGMA integrity_check") == [("ok",)]
    with serve_scripted() as served:
        assert ask(served.client(), "still there?") > max(before)
        assert httpx.get(served.url + app.READY_PATH, timeout=10).status_code == 200

    # A second restore into a home that is no longer empty is refused.
    assert cli.main(["restore", str(dest)]) == 1
    assert "already holds" in capsys.readouterr().err


def test_a_damaged_backup_is_refused(tuneloop_home, tmp_path, monkeypatch, capsys):
    fake_adapter("v1")
    adapters.set_current("v1", "test")
    assert cli.main(["backup", str(tmp_path / "b")]) == 0
    weights = tmp_path / "b" / "adapters" / "v1" / adapters.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"X")
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "restored"))
    assert cli.main(["restore", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "v1/adapter_model.safetensors does not match its checksum" in err.replace(adapters.WEIGHTS_FILE, "adapter_model.safetensors")
    assert not paths.feedback_db().exists()
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(backup.BackupError, match="not a tuneloop backup"):
        backup.restore(tmp_path / "b")
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.backup(tmp_path / "b")
