"""Curation: turn imported examples and staff/customer feedback into a dataset snapshot.

Reads top to bottom: gather candidates, drop exact duplicates by hash, drop training candidates
that are (near) copies of a test question, collapse near-duplicates keeping the best, check the
guardrails, write the snapshot (unless nothing changed).

* Gold: staff corrections (the corrected answer replaces the turn's answer), staff approvals,
  hand-written ``manual`` examples, and imported/pack examples.
* Silver, only with ``include_thumbs_up`` (off by default: a vote costs an anonymous customer
  nothing, so by default a thumbs-up trains only once staff approve it, which makes it gold):
  answers whose counting vote is a thumbs-up. The counting vote is
  the latest unflagged vote of the turn, as in :mod:`feedback.store`; a turn with a staff
  correction or approval is trained on the staff answer only.
* A thumbs-down never becomes a training target; only a staff correction of it does.
* Feedback goes to train, never to val or test; imported examples keep the split chosen at import.
* Among near-duplicate training questions the best one stays: gold over silver, then the newest.
* Decontamination: a training candidate whose question is within the near-duplicate threshold of a
  test question is dropped and counted, so the test score is not inflated by memorised copies.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from assistant import paths, progress
from assistant.config import as_dict, check
from feedback import datasets, dedupe

GOLD, SILVER = 0, 1
DROP_REASONS = ("exact_duplicate", "near_duplicate", "contaminated", "superseded_by_staff", "thumbs_down")
LABEL_IMBALANCE_WARN = 10  # warn when the commonest label has this many times the rarest's count


@dataclass
class CurateConfig:
    include_thumbs_up: bool = False
    """Also train on answers customers gave a thumbs-up without staff approval (silver); off, since anyone can vote."""
    near_duplicate_threshold: float = dedupe.NEAR_DUPLICATE_THRESHOLD
    """Cosine similarity at or above which two questions count as the same (collapse, decontamination)."""
    min_train_examples: int = 20
    """Refuse to write a snapshot with fewer training examples than this."""
    warn_train_examples: int = 100
    """Warn when the training split has fewer examples than this."""
    dry_run: bool = False
    """Report what the snapshot would be without writing anything."""

    def __post_init__(self) -> None:
        check(0.0 < self.near_duplicate_threshold <= 1.0, "near_duplicate_threshold must be in (0, 1]")
        check(self.min_train_examples >= 1, "min_train_examples must be at least 1")
        check(self.warn_train_examples >= self.min_train_examples, "warn_train_examples must be >= min_train_examples")


class CurateError(RuntimeError):
    """Curation refused to write a snapshot; the message says what to do."""


@dataclass
class Candidate:
    id: str
    question: str
    answer: str
    label: str | None
    source: str
    split: str
    rank: int
    created_at: str
    order: tuple[int, int]

    def row(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "label": self.label, "source": self.source}


@dataclass
class CurateResult:
    version: str
    """The snapshot written, the existing one when unchanged, or the one a dry run would write."""
    path: str
    counts: dict[str, int]
    dropped: dict[str, int]
    unchanged: bool = False
    dry_run: bool = False
    labels: dict[str, int] = field(default_factory=dict)
    """Training examples per label (label balance)."""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def main(cfg: CurateConfig, db: sqlite_utils.Database | None = None) -> CurateResult:
    """Curate the feedback database into a new snapshot (or report that nothing changed)."""
    from feedback.db import connect

    db = db or connect()
    dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
    why: dict[str, str] = {}  # candidate id -> reason it was dropped, for the manifest's changes

    # A dry run, or a curation that changes nothing, ends after the comparison: nothing is written.
    with progress.stages("tuneloop curate", 4 if cfg.dry_run else 5) as stages:
        stages.start("gathering examples and feedback")
        held_out, training, superseded = gather(db, cfg.include_thumbs_up)
        dropped["superseded_by_staff"] = len(superseded)
        why.update({cid: "superseded by a staff correction or approval of the same turn" for cid in superseded})
        dropped["thumbs_down"] = count_thumbs_down_only(db)

        training = best_first(training)
        training = drop_exact_duplicates(training, dropped, why)
        test_rows = [c for c in held_out if c.split == "test"]
        cache = dedupe.EmbeddingCache(db, persist=not cfg.dry_run)
        stages.start("removing training questions that match a test question")
        training = decontaminate(training, test_rows, cache, cfg.near_duplicate_threshold, dropped, why)
        stages.start("merging near-duplicate questions")
        training = collapse_near_duplicates(training, cache, cfg.near_duplicate_threshold, dropped, why)

        stages.start("comparing with the latest snapshot")
        splits = {"train": sorted(training, key=lambda c: c.order)}
        for name in ("val", "test"):
            splits[name] = sorted((c for c in held_out if c.split == name), key=lambda c: c.order)
        counts = {name: len(rows) for name, rows in splits.items()}
        labels = dict(sorted(Counter(c.label or "(none)" for c in splits["train"]).items()))
        warnings = guardrails(counts["train"], labels, cfg)

        files = {f"{name}.jsonl": datasets.render_split([c.row() for c in splits[name]]) for name in datasets.SPLITS}
        hashes = {name: datasets.sha256_bytes(data) for name, data in files.items()}
        previous = datasets.latest_snapshot()
        previous_manifest = datasets.load_manifest(previous) if previous else None
        result = CurateResult(version="", path="", counts=counts, dropped=dict(dropped), dry_run=cfg.dry_run,
                              labels=labels, warnings=warnings)
        if previous_manifest and {n: f["sha256"] for n, f in previous_manifest["files"].items()} == hashes:
            result.version, result.path, result.unchanged = previous.name, str(previous), True
            return result

        version = datasets.next_version(db)
        result.version = version
        result.path = str(paths.datasets_dir() / version)
        if cfg.dry_run:
            return result
        stages.start(f"writing snapshot {version}")
        manifest = build_manifest(version, splits, hashes, dict(dropped), why, previous_manifest, cfg, warnings)
        datasets.write_snapshot(db, version, files, manifest)
    return result


def gather(db: sqlite_utils.Database, include_thumbs_up: bool) -> tuple[list[Candidate], list[Candidate], list[str]]:
    """(val/test examples, training candidates, ids of thumbs-up candidates a staff row replaces)."""
    held_out, training = [], []
    for r in db.query("select id, question, answer, label, source, split, created_at from examples"):
        c = Candidate(f"examples:{r['id']}", r["question"], r["answer"], r["label"], r["source"], r["split"], GOLD,
                      r["created_at"], (0, r["id"]))
        (training if c.split == "train" else held_out).append(c)

    # The latest staff correction or approval of a turn replaces its answer; older ones are superseded.
    latest_staff = {r["turn_id"]: r["id"] for r in db.query(
        "select turn_id, max(id) as id from corrections where kind in ('correction', 'approval') and turn_id is not null group by turn_id")}
    superseded = []
    for r in db.query("select id, turn_id, kind, question, answer, label, created_at from corrections order by id"):
        cid = f"corrections:{r['id']}"
        if r["turn_id"] is not None and r["kind"] != "manual" and latest_staff.get(r["turn_id"]) != r["id"]:
            superseded.append(cid)
            continue
        training.append(Candidate(cid, r["question"], r["answer"], r["label"], r["kind"], "train", GOLD,
                                  r["created_at"], (1, r["id"])))

    if include_thumbs_up:
        for r in db.query(
            """
            select t.id, t.question, t.answer, v.created_at
            from votes v
            join (select turn_id, max(id) as id from votes where flagged = 0 group by turn_id) last on last.id = v.id
            join turns t on t.id = v.turn_id
            where v.value = 1 and t.status = 'complete' and trim(coalesce(t.answer, '')) != ''
            """
        ):
            cid = f"turns:{r['id']}"
            if r["id"] in latest_staff:
                superseded.append(cid)
                continue
            training.append(Candidate(cid, r["question"], r["answer"], None, "thumbs_up", "train", SILVER,
                                      r["created_at"], (2, r["id"])))
    return held_out, training, superseded


def count_thumbs_down_only(db: sqlite_utils.Database) -> int:
    """Turns whose counting vote is a thumbs-down and that no staff member corrected or approved."""
    return db.execute(
        """
        select count(*) from votes v
        join (select turn_id, max(id) as id from votes where flagged = 0 group by turn_id) last on last.id = v.id
        where v.value = -1 and v.turn_id not in
            (select turn_id from corrections where kind in ('correction', 'approval') and turn_id is not null)
        """
    ).fetchone()[0]


def best_first(candidates: list[Candidate]) -> list[Candidate]:
    """Gold before silver, then newest first, then by id (a total, stable order)."""
    ordered = sorted(candidates, key=lambda c: c.order)
    ordered.sort(key=lambda c: c.created_at, reverse=True)
    ordered.sort(key=lambda c: c.rank)
    return ordered


def drop_exact_duplicates(candidates: list[Candidate], dropped: Counter, why: dict) -> list[Candidate]:
    """Keep the first (best) candidate per normalised question; no embedding needed."""
    seen: dict[str, str] = {}
    kept = []
    for c in candidates:
        key = dedupe.question_hash(c.question)
        if key in seen:
            dropped["exact_duplicate"] += 1
            why[c.id] = f"same question as {seen[key]}"
        else:
            seen[key] = c.id
            kept.append(c)
    return kept


def decontaminate(candidates: list[Candidate], test_rows: list[Candidate], cache: dedupe.EmbeddingCache,
                  threshold: float, dropped: Counter, why: dict) -> list[Candidate]:
    """Drop training candidates whose question is a copy (by hash) or a near copy of a test question."""
    if not test_rows:
        return candidates
    test_hashes = {dedupe.question_hash(t.question): t.id for t in test_rows}
    remaining = []
    for c in candidates:
        hit = test_hashes.get(dedupe.question_hash(c.question))
        if hit:
            dropped["contaminated"] += 1
            why[c.id] = f"same question as test row {hit}"
        else:
            remaining.append(c)
    if not remaining:
        return remaining
    best, where = dedupe.nearest(cache.vectors([c.question for c in remaining]), cache.vectors([t.question for t in test_rows]))
    kept = []
    for c, sim, idx in zip(remaining, best.tolist(), where.tolist()):
        if sim >= threshold:
            dropped["contaminated"] += 1
            why[c.id] = f"near-duplicate (cosine {sim:.2f}) of test row {test_rows[idx].id}"
        else:
            kept.append(c)
    return kept


def collapse_near_duplicates(candidates: list[Candidate], cache: dedupe.EmbeddingCache, threshold: float,
                             dropped: Counter, why: dict) -> list[Candidate]:
    """Among near-duplicate questions keep the best-ranked (candidates arrive best first)."""
    if not candidates:
        return candidates
    dup_of = dedupe.greedy_collapse(cache.vectors([c.question for c in candidates]), threshold)
    kept = []
    for c, other in zip(candidates, dup_of.tolist()):
        if other >= 0:
            dropped["near_duplicate"] += 1
            why[c.id] = f"near-duplicate of {candidates[other].id}, which ranks higher or is newer"
        else:
            kept.append(c)
    return kept


def guardrails(train_count: int, labels: dict[str, int], cfg: CurateConfig) -> list[str]:
    """Refuse too little data; warn about little data and lopsided labels."""
    if train_count < cfg.min_train_examples:
        raise CurateError(
            f"only {train_count} training examples after curation; at least {cfg.min_train_examples} are needed "
            f"(min_train_examples). Import examples with `tuneloop data import FILE` or add staff corrections."
        )
    warnings = []
    if train_count < cfg.warn_train_examples:
        warnings.append(f"only {train_count} training examples (fewer than {cfg.warn_train_examples}); the adapter may not improve")
    named = {k: v for k, v in labels.items() if k != "(none)"}
    if len(named) > 1 and max(named.values()) >= LABEL_IMBALANCE_WARN * min(named.values()):
        rare = min(named, key=named.get)
        common = max(named, key=named.get)
        warnings.append(f"labels are unbalanced: {common!r} has {named[common]} training examples, {rare!r} only {named[rare]}")
    return warnings


def build_manifest(version: str, splits: dict[str, list[Candidate]], hashes: dict[str, str], dropped: dict[str, int],
                   why: dict[str, str], previous: dict | None, cfg: CurateConfig, warnings: list[str]) -> dict:
    """Where every row came from, what changed since the previous version and why."""
    row_ids = {name: [c.id for c in rows] for name, rows in splits.items()}
    changes = {"previous": previous["version"] if previous else None, "added": {}, "removed": {}}
    for name, ids in row_ids.items():
        before = set(previous["row_ids"][name]) if previous else set()
        now = set(ids)
        changes["added"][name] = [i for i in ids if i not in before]
        changes["removed"][name] = [
            {"id": i, "reason": why.get(i, "no longer a candidate (row deleted, vote changed or flagged, or thumbs-up turned off)")}
            for i in sorted(before - now)
        ]
    return {
        "version": version,
        "created_at": datasets.now(),
        "embedding_model": dedupe.embeddings.EMBEDDING_MODEL_NAME,
        "config": as_dict(cfg),
        "files": {name: {"sha256": digest, "rows": len(splits[name.removesuffix(".jsonl")])} for name, digest in hashes.items()},
        "counts": {name: len(rows) for name, rows in splits.items()},
        "by_source": {name: dict(sorted(Counter(c.source for c in rows).items())) for name, rows in splits.items()},
        "by_label": {name: dict(sorted(Counter(c.label or "(none)" for c in rows).items())) for name, rows in splits.items()},
        "row_ids": row_ids,
        "dropped": dropped,
        "dropped_rows": dict(sorted(why.items())),
        "changes": changes,
        "warnings": warnings,
    }
