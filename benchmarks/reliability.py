"""Reliability figures: load while curation runs, faults survived, hostile inputs handled.

Customers chat and vote at once while curation writes to the same database; faults are injected
(kill -9 of the app and of the retrain, damaged adapters, a full disk); hostile inputs go to every
entry point. The pieces are the reliability tests' own (``tests/reliability/reliability_harness.py``);
this script runs them once more and counts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reliability.py --quick

Prints sessions held, turns and votes sent vs stored, p99 answer latency, a line ``lost: N`` (turns
and votes the server acknowledged but the database does not hold, after load and after every kill),
faults injected vs survived, and bad inputs tried vs handled (accepted, or refused with a message
written for a person). Every part runs in its own fresh temporary ``$TUNELOOP_HOME``, removed at the
end. ``--quick`` takes a few minutes on 2 CPU cores; the damaged-adapter part checks
``adapters.validate`` on a synthetic adapter (the tests check the serving side on the tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere
sys.path.insert(0, str(REPO / "tests" / "reliability"))

import reliability_harness as harness  # noqa: E402


@dataclass
class ReliabilityConfig:
    customers: int = 50
    """Customers at once, each its own gradio_client session, asking and voting."""
    seconds: float = 60.0
    """How long the customers keep going while curation runs."""
    server_kills: int = 3
    """Rounds of kill -9 of the app mid-answer and mid-vote, each followed by a restart."""

    def __post_init__(self) -> None:
        if not 1 <= self.customers <= 200:
            raise ValueError("customers must be between 1 and 200 (2 CPU cores are shared)")
        if not 1 <= self.seconds <= 600:
            raise ValueError("seconds must be between 1 and 600")
        if not 0 <= self.server_kills <= 10:
            raise ValueError("server_kills must be between 0 and 10")


QUICK = ReliabilityConfig(customers=50, seconds=30, server_kills=2)


HOMES: list[Path] = []


def fresh_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="tuneloop-reliability-"))
    os.environ["TUNELOOP_HOME"] = str(home)
    HOMES.append(home)
    return home


def load(cfg: ReliabilityConfig) -> dict:
    home = fresh_home()
    ledger, summary = harness.load_during_curation(home, cfg.customers, cfg.seconds)
    stored = harness.check_stored(home / "feedback.db", ledger)
    return {"sessions": ledger.sessions, "turns_sent": ledger.turns_sent, "turns_acked": len(ledger.turns),
            "turns_stored": len(ledger.turns) - len(stored.lost_turns), "votes_sent": ledger.votes_sent,
            "votes_acked": len(ledger.votes), "votes_stored": len(ledger.votes) - len(stored.lost_votes),
            "lost": stored.lost, "errors": ledger.errors, "locked_errors": sum("locked" in e.lower() for e in ledger.errors),
            "p99_s": ledger.p99(), "integrity": harness.integrity_check(home / "feedback.db"),
            "curations": summary["curations"], "snapshots": len(summary["snapshots"]), "job_errors": summary["errors"]}


def server_kills(cfg: ReliabilityConfig) -> tuple[list[bool], int]:
    survived, lost = [], 0
    for _ in range(cfg.server_kills):
        facts = harness.server_kill_round(fresh_home())
        lost += facts["lost"]
        survived.append(facts["integrity"] == facts["integrity_after_restart"] == "ok" and facts["lost"] == 0
                        and facts["killed_mid_answer"] and facts["cut_off_status"] == [("streaming",)]
                        and facts["restart_serves"])
    return survived, lost


def synthetic_adapter(version: str) -> Path:
    """A small, valid PEFT-format adapter folder (the scripted and validating paths never load it)."""
    import torch
    from safetensors.torch import save_file

    from assistant import adapters, paths

    folder = adapters.adapter_path(version)
    folder.mkdir(parents=True)
    torch.manual_seed(len(version))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 64),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(64, 4)}, str(folder / adapters.WEIGHTS_FILE))
    (folder / adapters.CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": "bench-base", "r": 4}))
    # As the trainer writes it: the weights' sha256 is what catches flipped bits.
    (folder / adapters.PROVENANCE_FILE).write_text(json.dumps(
        {"base_model": "bench-base", "weights_sha256": paths.sha256_file(folder / adapters.WEIGHTS_FILE)}))
    return folder


def promotion_kills() -> list[bool]:
    from assistant import adapters

    survived = []
    for pause in ("before", "after"):
        home = fresh_home()
        synthetic_adapter("v-old"), synthetic_adapter("v-new")
        adapters.set_current("v-old", "serving before the retrain")
        snapshot = home / "datasets" / "d0001"
        snapshot.mkdir(parents=True)
        (snapshot / "manifest.json").write_text(json.dumps({"version": "d0001", "counts": {}}))
        facts = harness.promotion_kill_round(home, snapshot, "v-new", pause)
        expected = "v-old" if pause == "before" else "v-new"
        whole = adapters.validate(adapters.adapter_path(facts["pointer"]), "bench-base", "") is not None
        survived.append(facts["pointer"] == expected and whole and facts["run"][1:] == ("running", "promote"))
    return survived


def damaged_adapters() -> dict[str, bool]:
    from assistant import adapters

    fresh_home()
    refused = {}
    for how in harness.DAMAGES:
        folder = synthetic_adapter(f"v-{how.replace('_', '-')}")
        harness.damage(folder / adapters.WEIGHTS_FILE, how)
        try:
            adapters.validate(folder, "bench-base", "")
            refused[how] = False
        except adapters.AdapterError:
            refused[how] = True
    return refused


def full_disk() -> list[bool]:
    from feedback.db import connect

    survived = []
    for fail_at in harness.SNAPSHOT_WRITE_POINTS:
        fresh_home()
        survived.append(harness.snapshot_round_survived(harness.snapshot_full_disk_round(connect(), fail_at)))
    return survived


def bad_inputs() -> tuple[int, int, list[str]]:
    from assistant import config
    from feedback import auth, turns
    from feedback.db import connect

    fresh_home()
    db = connect()
    auth.add_staff(db, harness.STAFF_NAME, harness.STAFF_PASSWORD)
    session = turns.new_session(db)
    harness.entry_points()["chat"](db, session, None, "How do I freeze my card?")
    turn_id = db.execute("SELECT max(id) FROM turns").fetchone()[0]
    texts = {**harness.BAD_TEXTS, **harness.SURROGATE_TEXTS}
    tried, handled, failures = harness.bad_input_sweep(db, session, turn_id, texts)
    # Every serve setting given each hostile text, as a --flag or TUNELOOP_SERVE_* value would be.
    for name in config.ServeConfig.__dataclass_fields__:
        for text_name, text in texts.items():
            tried += 1
            try:
                config.load(config.ServeConfig, "serve", {name: text})
            except config.ConfigError:
                pass
            except Exception as exc:  # counted and listed, never raised
                failures.append(f"config {name}/{text_name}: {type(exc).__name__}")
                continue
            handled += 1
    return tried, handled, failures


def main(cfg: ReliabilityConfig) -> dict:
    os.environ.update(harness.QUIET_ENV)
    started = time.perf_counter()
    figures = {"load": load(cfg)}
    kills, kill_lost = server_kills(cfg)
    refused = damaged_adapters()
    figures["faults"] = {
        "server kill -9 mid-answer and mid-vote": kills,
        "retrain kill -9 mid-promotion (before and after the pointer flip)": promotion_kills(),
        "damaged adapter file refused": list(refused.values()),
        "full disk mid-snapshot (each write point)": full_disk(),
    }
    figures["not_refused"] = [how for how, ok in refused.items() if not ok]
    figures["lost"] = figures["load"]["lost"] + kill_lost
    figures["inputs"] = bad_inputs()
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def report(cfg: ReliabilityConfig, figures: dict) -> None:
    load_ = figures["load"]
    print(f"load: {cfg.customers} customers for {cfg.seconds:.0f} s while curation ran "
          f"({load_['curations']} curations, {load_['snapshots']} snapshots written)")
    print(f"sessions held: {load_['sessions']}")
    print(f"turns: sent {load_['turns_sent']}, answered {load_['turns_acked']}, stored {load_['turns_stored']}")
    print(f"votes: sent {load_['votes_sent']}, acknowledged {load_['votes_acked']}, stored {load_['votes_stored']}")
    print(f"errors seen by customers: {len(load_['errors'])} ('database is locked': {load_['locked_errors']})")
    print(f"p99 answer latency: {load_['p99_s']:.2f} s")
    print(f"database integrity: {load_['integrity']}")
    print(f"lost: {figures['lost']}")
    faults = figures["faults"]
    print(f"faults: injected {sum(len(v) for v in faults.values())}, survived {sum(sum(v) for v in faults.values())}")
    for name, outcomes in faults.items():
        print(f"  {name}: {sum(outcomes)}/{len(outcomes)}")
    if figures["not_refused"]:
        print(f"  damaged adapters served instead of refused: {', '.join(figures['not_refused'])}")
    tried, handled, failures = figures["inputs"]
    print(f"bad inputs: tried {tried}, handled {handled}")
    kinds = sorted({f.split(": ", 2)[1] + " in " + f.split("/")[0] for f in failures})
    for kind in kinds:
        print(f"  not handled: {kind}")
    print(f"took {figures['seconds']:.0f} s")


def parse_args(argv: list[str] | None = None) -> ReliabilityConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 customers for 30 s and two server kills (a few minutes)")
    parser.add_argument("--customers", type=int, help=f"customers at once (default {ReliabilityConfig.customers})")
    parser.add_argument("--seconds", type=float, help=f"load duration (default {ReliabilityConfig.seconds:.0f})")
    parser.add_argument("--server-kills", type=int, help=f"kill -9 rounds (default {ReliabilityConfig.server_kills})")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else ReliabilityConfig()
    return ReliabilityConfig(customers=args.customers or base.customers, seconds=args.seconds or base.seconds,
                             server_kills=base.server_kills if args.server_kills is None else args.server_kills)


if __name__ == "__main__":
    config = parse_args()
    try:
        report(config, main(config))
    finally:
        for folder in HOMES:
            shutil.rmtree(folder, ignore_errors=True)
