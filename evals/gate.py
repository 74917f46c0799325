"""The promotion gate: a candidate adapter replaces the one in service only when it measurably wins.

Four checks, all required, each written down as a reason whether it passes or fails:

1. **Gain**: candidate F1 >= incumbent F1 + ``min_delta`` (the incumbent is the current adapter, or
   the base model before the first promotion).
2. **Not noise**: a paired bootstrap over the test examples finds the candidate no better in at most
   ``max_p_not_better`` of the resamples.
3. **No forgetting**: perplexity on general (non-domain) text is at most ``max_perplexity_ratio``
   times the base model's. Every candidate is trained from the base, not from the incumbent, so
   what it forgot is measured against the base: an incumbent that happened to lower perplexity
   would otherwise raise the bar for the next candidate (the case that showed it is in
   docs/results.md).
4. **No invented facts**: the share of answers stating a figure, phone, address or URL that nothing
   in their prompt or the catalog states (``unsupported_facts``) rises by at most
   ``max_unsupported_rise`` over the incumbent's.

Every decision is stored in ``gate_decisions`` with its reasons and metrics, rejections included.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlite_utils

from assistant import paths
from assistant.config import check
from evals import metrics
from evals.evaluate import EvalReport
from feedback import packs

DEFAULT_PACK = "peach_state_bank"


@dataclass
class GateConfig:
    min_delta: float = 0.01
    """Least F1 gain over the adapter in service (or the base model) for a promotion."""
    max_p_not_better: float = 0.1
    """Largest share of bootstrap resamples in which the candidate may be no better (0.1 = 90% sure)."""
    max_perplexity_ratio: float = 1.25
    """Largest allowed rise of perplexity on general text, candidate / base model (forgetting check)."""
    bootstrap_samples: int = 1000
    """Resamples of the paired bootstrap."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    general_text: str = ""
    """File of general (non-domain) text, one passage per line; empty = the shipped pack's general.txt."""
    general_limit: int = 40
    """Passages of the general text used for perplexity (the first N)."""
    max_unsupported_rise: float = 0.02
    """Largest allowed rise of the share of answers with facts found in no reference, catalog, persona or question, candidate minus incumbent."""

    def __post_init__(self) -> None:
        check(-1.0 <= self.min_delta <= 1.0, "min_delta must be between -1 and 1 (F1 is in [0, 1])")
        check(0.0 <= self.max_p_not_better <= 1.0, "max_p_not_better must be between 0 and 1")
        check(self.max_perplexity_ratio >= 1.0, "max_perplexity_ratio must be at least 1.0 (1.25 allows a 25% rise)")
        check(10 <= self.bootstrap_samples <= 100_000, "bootstrap_samples must be between 10 and 100000")
        check(1 <= self.general_limit <= 10_000, "general_limit must be between 1 and 10000")
        check(0.0 <= self.max_unsupported_rise <= 1.0, "max_unsupported_rise must be between 0 and 1 (a share of answers)")


@dataclass
class Decision:
    """The gate's verdict on one candidate."""

    promote: bool
    reasons: list[str]
    """One line per check, passed or failed, in the order checked."""
    metrics: dict = field(default_factory=dict)
    """F1s, delta, bootstrap p and interval, perplexities and their ratio, unsupported-fact shares and their rise."""


def general_file(cfg: GateConfig) -> Path:
    """The general-text file: ``cfg.general_text``, or the shipped pack's general.txt."""
    return Path(cfg.general_text).expanduser() if cfg.general_text else paths.pack_dir(DEFAULT_PACK) / "general.txt"


def general_passages(cfg: GateConfig) -> list[str]:
    """Every passage (non-blank line) of the general-text file."""
    file = general_file(cfg)
    lines = packs.read_passages(file)
    if not lines:
        raise ValueError(f"{file} holds no general text; the forgetting check needs some")
    return lines


def general_texts(cfg: GateConfig) -> list[str]:
    """The passages the forgetting check measures perplexity on (the first ``general_limit``)."""
    return general_passages(cfg)[: cfg.general_limit]


def decide_promotion(candidate: EvalReport, incumbent: EvalReport, cfg: GateConfig, *, base: EvalReport) -> Decision:
    """Compare evaluation reports of the same test examples (see :func:`evals.evaluate.evaluate`):
    the candidate against the incumbent (the current adapter, or the base model), and its general-text
    perplexity against the ``base`` model's (the same report as ``incumbent`` before the first promotion).

    Candidate and base need ``perplexity`` measured on the same general text.
    """
    ids_c = [row["id"] for row in candidate.examples]
    ids_i = [row["id"] for row in incumbent.examples]
    if ids_c != ids_i:
        raise ValueError("the candidate and incumbent reports cover different test examples; evaluate both on the same set")
    if candidate.metric != incumbent.metric:
        raise ValueError(f"the reports use different gate metrics ({candidate.metric} vs {incumbent.metric})")
    if candidate.perplexity is None or base.perplexity is None:
        raise ValueError("the forgetting check needs perplexity on general text for both candidate and base model")
    if candidate.unsupported_facts is None or incumbent.unsupported_facts is None:
        raise ValueError("the grounding check needs unsupported_facts of both candidate and incumbent; evaluate them again")
    if base.adapter is not None:
        raise ValueError(f"base must be the base model's report, not adapter {base.adapter}'s")
    who = incumbent.adapter or "the base model"
    metric = candidate.metric
    delta = candidate.f1 - incumbent.f1
    if metric == "label_f1":
        truth = [row["label"] for row in candidate.examples]
        boot = metrics.bootstrap_gain(
            metrics.macro_f1, truth,
            [row["predicted_label"] for row in incumbent.examples],
            [row["predicted_label"] for row in candidate.examples],
            n=cfg.bootstrap_samples, seed=cfg.seed,
        )
    else:
        boot = metrics.bootstrap_gain(
            metrics.mean_score, None,
            [row["answer_f1"] for row in incumbent.examples],
            [row["answer_f1"] for row in candidate.examples],
            n=cfg.bootstrap_samples, seed=cfg.seed,
        )
    ratio = candidate.perplexity / base.perplexity

    gain_ok = delta >= cfg.min_delta - 1e-12  # equal-to-the-threshold gains pass despite float rounding
    noise_ok = boot["p_not_better"] <= cfg.max_p_not_better
    forget_ok = ratio <= cfg.max_perplexity_ratio
    rise = candidate.unsupported_facts - incumbent.unsupported_facts
    grounded_ok = rise <= cfg.max_unsupported_rise + 1e-12  # a rise equal to the threshold passes despite float rounding
    reasons = [
        f"{'PASS' if gain_ok else 'FAIL'} gain: {metric} {candidate.f1:.3f} vs {incumbent.f1:.3f} ({who}), "
        f"delta {delta:+.3f} {'>=' if gain_ok else '<'} min_delta {cfg.min_delta:.3f}",
        f"{'PASS' if noise_ok else 'FAIL'} not noise: paired bootstrap ({cfg.bootstrap_samples} resamples, "
        f"n={candidate.n}) p_not_better {boot['p_not_better']:.3f} {'<=' if noise_ok else '>'} "
        f"{cfg.max_p_not_better:.3f}, 95% CI of delta [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}]",
        f"{'PASS' if forget_ok else 'FAIL'} no forgetting: general-text perplexity {candidate.perplexity:.2f} vs "
        f"{base.perplexity:.2f} (the base model), ratio {ratio:.3f} {'<=' if forget_ok else '>'} {cfg.max_perplexity_ratio:.3f}",
        f"{'PASS' if grounded_ok else 'FAIL'} no invented facts: unsupported_facts {candidate.unsupported_facts:.3f} vs "
        f"{incumbent.unsupported_facts:.3f} ({who}), rise {rise:+.3f} {'<=' if grounded_ok else '>'} "
        f"max_unsupported_rise {cfg.max_unsupported_rise:.3f}",
    ]
    return Decision(
        promote=gain_ok and noise_ok and forget_ok and grounded_ok,
        reasons=reasons,
        metrics={
            "metric": metric,
            "candidate_f1": candidate.f1,
            "incumbent_f1": incumbent.f1,
            "delta": delta,
            "p_not_better": boot["p_not_better"],
            "ci_low": boot["ci_low"],
            "ci_high": boot["ci_high"],
            "candidate_perplexity": candidate.perplexity,
            "base_perplexity": base.perplexity,
            "incumbent_perplexity": incumbent.perplexity,
            "perplexity_ratio": ratio,
            "candidate_unsupported_facts": candidate.unsupported_facts,
            "incumbent_unsupported_facts": incumbent.unsupported_facts,
            "unsupported_rise": rise,
            "candidate_knn_label_f1": candidate.knn_label_f1,
            "n": candidate.n,
        },
    )


def record_decision(
    db: sqlite_utils.Database, decision: Decision, candidate: str, incumbent: str | None, cfg: GateConfig,
    run_id: int | None = None,
) -> int:
    """Store a decision (promotion or rejection) with its reasons; returns its row id. The one
    writer of ``gate_decisions`` (the staff view reads it back through :func:`feedback.review.last_decision`)."""
    return db["gate_decisions"].insert(
        {
            "run_id": run_id,
            "candidate": candidate,
            "incumbent": incumbent,
            "promote": int(decision.promote),
            "reasons": json.dumps(decision.reasons),
            "metrics": json.dumps(decision.metrics),
            "config": json.dumps(asdict(cfg)),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    ).last_pk
