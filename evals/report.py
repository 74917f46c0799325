"""``tuneloop report``: one HTML page with PNG plots under ``$TUNELOOP_HOME/reports/``.

It shows F1 (beside the nearest-training-question baseline and the share of answers with unsupported
facts) across adapter versions (candidate, adapter in service, base and few-shot baselines per
retrain run), training and validation loss curves, the most-confused labels of the latest
candidate, the answers it fixed and broke against the adapter it was compared with, the latest gate
decision, and the share of answers staff marked accurate and helpful per adapter.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from assistant import adapters, paths
from assistant.config import check
from evals import schema
from evals.evaluate import EvalReport
from feedback import review

ROLES = ("candidate", "current", "base", "few_shot")


@dataclass
class ReportConfig:
    output: str = ""
    """Folder for report.html and its PNGs; empty = $TUNELOOP_HOME/reports."""
    loss_curves: int = 5
    """Newest adapters whose loss curves are drawn."""
    examples: int = 10
    """Fixed and broken answers listed, each."""

    def __post_init__(self) -> None:
        check(1 <= self.loss_curves <= 50, "loss_curves must be between 1 and 50")
        check(0 <= self.examples <= 1000, "examples must be between 0 and 1000")


def main(cfg: ReportConfig) -> dict:
    """Write ``report.html`` and its plots; returns ``{"html": path, "plots": [paths]}``."""
    folder = Path(cfg.output).expanduser() if cfg.output else paths.reports_dir()
    folder.mkdir(parents=True, exist_ok=True)
    db = schema.connect()
    runs = _run_reports(db)
    latest = runs[-1] if runs else {}
    plots = [
        plot_f1_history(runs, folder / review.F1_HISTORY_PNG),
        plot_losses(_loss_histories(cfg.loss_curves), folder / "loss_curves.png"),
        plot_confusions(latest.get("candidate"), folder / "confusions.png"),
    ]
    incumbent = latest.get("current") or latest.get("base")
    fixed, broken = fixed_and_broken(latest.get("candidate"), incumbent, cfg.examples)
    page = _html(latest, review.last_decision(db), fixed, broken, review.helpful_shares(db), [p.name for p in plots])
    file = folder / "report.html"
    file.write_text(page, encoding="utf-8")
    return {"html": str(file), "plots": [str(p) for p in plots]}


def _run_reports(db) -> list[dict]:
    """Per retrain run (oldest first): ``{"run": run id, role: EvalReport, ...}`` from ``eval_reports``."""
    runs: dict[int, dict] = {}
    for row in db.query("select run_id, role, report from eval_reports where run_id is not null order by id"):
        runs.setdefault(row["run_id"], {"run": row["run_id"]})[row["role"]] = EvalReport.from_json(json.loads(row["report"]))
    return [runs[key] for key in sorted(runs) if "candidate" in runs[key]]


def _loss_histories(limit: int) -> dict[str, dict]:
    histories = {}
    for version in adapters.list_versions()[-limit:]:
        file = adapters.adapter_path(version) / "loss_history.json"
        if file.exists():
            histories[version] = json.loads(file.read_text(encoding="utf-8"))
    return histories


def _figure(size=(7, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)  # draws without pyplot: no global backend state, safe in a server thread
    return figure


def plot_f1_history(runs: list[dict], file: Path) -> Path:
    """Gate F1 of candidate, adapter in service, base and few-shot base per retrain run."""
    figure = _figure()
    axes = figure.add_subplot()
    names = [f"{run['candidate'].adapter}\n(run {run['run']})" for run in runs]
    for role in ROLES:
        points = [(i, run[role].f1) for i, run in enumerate(runs) if run.get(role)]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=role.replace("_", "-"))
    knn = [(i, run["candidate"].knn_label_f1) for i, run in enumerate(runs) if run["candidate"].knn_label_f1 is not None]
    if knn:  # the baseline every system must beat: the nearest training question's label
        axes.plot([p[0] for p in knn], [p[1] for p in knn], "k:", label="1-NN baseline")
    axes.set_xticks(range(len(names)), names, fontsize=6, rotation=20)
    axes.set_ylabel("gate F1")
    axes.set_ylim(0, 1)
    axes.set_title("F1 across adapter versions" if runs else "F1 across adapter versions (no retrain yet)")
    if runs:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(file, dpi=100)
    return file


def plot_losses(histories: dict[str, dict], file: Path) -> Path:
    """Train (line) and validation (dots) loss per optimizer step of the newest adapters."""
    figure = _figure()
    axes = figure.add_subplot()
    for version, history in histories.items():
        line, = axes.plot([e["step"] for e in history["train"]], [e["loss"] for e in history["train"]],
                          linewidth=1, label=f"{version} train")
        axes.plot([e["step"] for e in history["val"]], [e["loss"] for e in history["val"]], "o--",
                  color=line.get_color(), label=f"{version} val")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("Loss curves" if histories else "Loss curves (no adapter trained yet)")
    if histories:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(file, dpi=100)
    return file


def plot_confusions(report: EvalReport | None, file: Path) -> Path:
    """The most frequent (true label -> predicted label) mistakes of the latest candidate."""
    confusions = report.confusions if report else []
    figure = _figure()
    axes = figure.add_subplot()
    names = [f"{c['true']} -> {c['predicted']}" for c in confusions][::-1]
    axes.barh(range(len(names)), [c["count"] for c in confusions][::-1])
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("test answers")
    axes.set_title("Most-confused labels (latest candidate)" if confusions else "Most-confused labels (none)")
    figure.tight_layout()
    figure.savefig(file, dpi=100)
    return file


def correct(row: dict) -> bool:
    """An answer counts as right when its predicted label matches, or (no labels) answer F1 >= 0.5."""
    if row.get("label") is not None and row.get("predicted_label") is not None:
        return row["predicted_label"] == row["label"]
    return row["answer_f1"] >= 0.5


def fixed_and_broken(candidate: EvalReport | None, incumbent: EvalReport | None, limit: int) -> tuple[list[dict], list[dict]]:
    """Test answers the candidate got right where the incumbent was wrong (fixed), and the reverse."""
    if not candidate or not incumbent:
        return [], []
    fixed, broken = [], []
    for new, old in zip(candidate.examples, incumbent.examples):
        pair = {"question": new["question"], "reference": new["reference"], "label": new.get("label"),
                "before": old["answer"], "after": new["answer"]}
        if correct(new) and not correct(old):
            fixed.append(pair)
        elif correct(old) and not correct(new):
            broken.append(pair)
    return fixed[:limit], broken[:limit]


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>" if rows else "<p><em>none</em></p>"


def _interval(bounds: list[float] | None) -> str | None:
    """A bootstrap interval as text; None (shown as -) for reports written before intervals were."""
    return None if not bounds else f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def _retrieval(settings: dict | None) -> str:
    """The references a system's prompts held: ``k=3 >= 0.40``, or none."""
    return "none" if not settings else f"k={settings['k']} >= {settings['min_score']:.2f}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _html(latest: dict, decision: review.StoredDecision | None, fixed: list[dict], broken: list[dict], shares: list[dict],
          plots: list[str]) -> str:
    systems = [
        [role, r.adapter or "base", r.n, r.f1, _interval(r.f1_ci), r.knn_label_f1, r.unsupported_facts, _retrieval(r.retrieval),
         r.label_f1, r.answer_f1, r.rouge_l, r.bleu, r.latency_s, r.tokens_per_answer, r.prompt_tokens, r.perplexity]
        for role in ROLES if (r := latest.get(role))
    ]
    examples = lambda rows: _table(["question", "label", "reference", "before", "after"],  # noqa: E731
                                   [[e["question"], e["label"], e["reference"], e["before"], e["after"]] for e in rows])
    verdict = "none yet" if decision is None else ("PROMOTED" if decision.promote else "REJECTED")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tuneloop report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}img{max-width:100%}</style></head><body>",
        "<h1>tuneloop report</h1>",
        f"<p>Adapter serving now: <b>{html.escape(adapters.current_version() or 'none (base model)')}</b></p>",
        f"<h2>Latest gate decision: {verdict}</h2>",
    ]
    if decision:
        parts.append(f"<p>{html.escape(decision.candidate)} against {html.escape(decision.incumbent or 'the base model')}"
                     f" at {html.escape(decision.created_at)}</p><ul>"
                     + "".join(f"<li>{html.escape(r)}</li>" for r in decision.reasons) + "</ul>")
    parts += [
        "<h2>Latest evaluation: candidate and baselines</h2>",
        _table(["role", "adapter", "n", "F1 (gate)", "F1 95% CI", "1-NN label F1", "unsupported facts", "references", "label F1", "answer F1", "ROUGE-L", "BLEU", "latency s/answer",
                "tokens/answer", "prompt tokens", "general ppl"], systems),
        "".join(f"<p><img src='{html.escape(p)}' alt='{html.escape(p)}'></p>" for p in plots),
        f"<h2>Answers the candidate fixed ({len(fixed)} shown)</h2>", examples(fixed),
        f"<h2>Answers the candidate broke ({len(broken)} shown)</h2>", examples(broken),
        "<h2>Human review: share marked accurate and helpful</h2>",
        _table(["adapter", "marks", "helpful share"], [[s["adapter"], s["marks"], s["helpful_share"]] for s in shares]),
        "</body></html>",
    ]
    return "\n".join(parts)
