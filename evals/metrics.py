"""Evaluation metrics: answer overlap, intent-label scores, paired bootstrap and perplexity.

Answer text is compared with SQuAD token F1 / exact match, ROUGE-L (``rouge_score``) and corpus
BLEU (``sacrebleu``). Predicted intent labels are scored with scikit-learn. ``bootstrap_gain`` says
whether system B beats system A by more than test-set luck, which is what the promotion gate needs;
``bootstrap_interval`` says how far one system's figure could move on another draw of test questions.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from assistant.model import perplexity  # noqa: F401  (evaluation's name for it; the trainer uses it too)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    # Same steps, in the same order, as the official SQuAD v1.1 evaluation script, so our F1 matches
    # published SQuAD-style figures.
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, reference: str) -> float:
    """SQuAD token-level F1 between one predicted and one reference answer, in [0, 1]."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        # Two empty answers agree; an empty answer against a non-empty one shares nothing.
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two answers are equal after ``normalize_answer``, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over aligned prediction/reference pairs, in [0, 1].

    Uses Google's ``rouge_score`` with the Porter stemmer (the ``-m`` flag of the original
    ROUGE-1.5.5 that most papers report); nothing is downloaded.
    """
    from rouge_score import rouge_scorer

    _check_aligned(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return float(np.mean(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of the predictions against one reference each, on a 0-1 scale.

    ``sacrebleu`` reports 0-100; we divide by 100 so every metric in a report shares the 0-1 scale.
    """
    import sacrebleu

    _check_aligned(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0)


def label_scores(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None, top_confusions: int = 10
) -> dict[str, Any]:
    """Macro precision/recall/F1, accuracy, a per-label table and the most frequent mistakes.

    ``labels`` defaults to the labels present in ``y_true``: a predicted label outside them (an
    "unknown" abstention, say) counts as a miss for the true label instead of adding an empty column
    that would drag the macro average down. Returns ``{"precision", "recall", "f1", "accuracy", "n",
    "per_label": {label: {"precision", "recall", "f1", "support"}}, "confusions": [{"true",
    "predicted", "count"}, ...]}``.
    """
    from sklearn.metrics import precision_recall_fscore_support

    _check_aligned(y_pred, y_true)
    y_true = [str(y) for y in y_true]
    y_pred = [str(y) for y in y_pred]
    labels = sorted(set(y_true)) if labels is None else [str(label) for label in labels]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    per_label = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    mistakes = collections.Counter((t, p) for t, p in zip(y_true, y_pred) if t != p)
    confusions = [
        {"true": t, "predicted": p, "count": count}
        # Ties broken by label names so reports are identical run to run.
        for (t, p), count in sorted(mistakes.items(), key=lambda item: (-item[1], item[0]))[:top_confusions]
    ]
    return {
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "f1": float(np.mean(f1)),
        "accuracy": float(np.mean([t == p for t, p in zip(y_true, y_pred)])),
        "n": len(y_true),
        "per_label": per_label,
        "confusions": confusions,
    }


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Macro F1 over the labels present in ``y_true``; equals ``label_scores(...)["f1"]``.

    Written in numpy because ``bootstrap_gain`` calls it 2,000 times per comparison and
    scikit-learn's input validation alone costs about a millisecond per call.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_codes, pred_codes = codes[: len(y_true)], codes[len(y_true) :]
    k = len(classes)
    support = np.bincount(true_codes, minlength=k)
    predicted = np.bincount(pred_codes, minlength=k)
    hits = np.bincount(true_codes[true_codes == pred_codes], minlength=k)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); 0 where both are 0, like zero_division=0.
    denominator = support + predicted
    f1 = np.divide(2 * hits, denominator, out=np.zeros(k), where=denominator > 0)
    return float(f1[support > 0].mean())


def mean_score(_y_true: Any, scores: Sequence[float]) -> float:
    """Mean of per-example scores; the ``metric_fn`` for ``bootstrap_gain`` on answer F1 lists."""
    return float(np.mean(scores))


def bootstrap_gain(
    metric_fn: Callable[[Any, Any], float],
    y_true: Sequence[Any] | None,
    pred_a: Sequence[Any],
    pred_b: Sequence[Any],
    n: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap test of whether system B scores higher than system A on the same examples.

    Each of ``n`` resamples draws example indices with replacement and recomputes
    ``metric_fn(y_true[idx], pred[idx])`` for both systems. Returns ``delta`` (B - A on the full
    set), ``p_not_better`` (share of resamples where B <= A), and ``ci_low``/``ci_high`` (95%
    percentile interval of B - A).

    Labels: ``bootstrap_gain(macro_f1, y_true, labels_a, labels_b)``. Answer F1: score each example
    once and resample the scores, ``bootstrap_gain(mean_score, None, f1_a, f1_b)``, which is far
    faster than recomputing token overlaps inside every resample.
    """
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    _check_aligned(pred_a, pred_b)
    if y_true is not None:
        y_true = np.asarray(y_true)
        _check_aligned(pred_a, y_true)
    size = len(pred_a)
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    indices = np.random.default_rng(seed).integers(0, size, size=(n, size))
    deltas = _resampled(metric_fn, y_true, pred_b, indices) - _resampled(metric_fn, y_true, pred_a, indices)
    delta = metric_fn(y_true, pred_b) - metric_fn(y_true, pred_a)
    ci_low, ci_high = np.percentile(deltas, [2.5, 97.5])
    return {
        "delta": float(delta),
        "p_not_better": float(np.mean(deltas <= 0)),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "n_resamples": n,
    }


def bootstrap_interval(
    metric_fn: Callable[[Any, Any], float],
    y_true: Sequence[Any] | None,
    pred: Sequence[Any],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap interval of one system's score on a test set.

    How far the figure could move on another draw of as many test questions of the same kind:
    ``n`` resamples of the examples with replacement, ``metric_fn(y_true[idx], pred[idx])`` on
    each. Returns ``score`` (on the full set), ``ci_low`` and ``ci_high`` (the central ``level``
    share of the resampled scores) and ``n_resamples``. Called like ``bootstrap_gain``:
    ``bootstrap_interval(macro_f1, y_true, labels)`` or ``bootstrap_interval(mean_score, None, f1s)``.
    """
    pred = np.asarray(pred)
    if y_true is not None:
        y_true = np.asarray(y_true)
        _check_aligned(pred, y_true)
    elif len(pred) == 0:
        raise ValueError("nothing to score: the lists are empty")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    scores = _resampled(metric_fn, y_true, pred, np.random.default_rng(seed).integers(0, len(pred), size=(n, len(pred))))
    tail = (1.0 - level) / 2 * 100
    ci_low, ci_high = np.percentile(scores, [tail, 100 - tail])
    return {"score": float(metric_fn(y_true, pred)), "ci_low": float(ci_low), "ci_high": float(ci_high), "n_resamples": n}


def _resampled(metric_fn: Callable[[Any, Any], float], y_true: np.ndarray | None, pred: np.ndarray,
               indices: np.ndarray) -> np.ndarray:
    """``metric_fn`` on each resample: one row of example indices per resample."""
    return np.array([metric_fn(None if y_true is None else y_true[idx], pred[idx]) for idx in indices])


def _check_aligned(first: Sequence[Any], second: Sequence[Any]) -> None:
    if len(first) != len(second):
        raise ValueError(f"got {len(first)} predictions but {len(second)} references; they must align")
    if len(first) == 0:
        raise ValueError("nothing to score: the lists are empty")


# --- facts an answer states -----------------------------------------------------------------------

FACT_KINDS = ("email", "url", "phone", "percent", "amount", "number")

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SCALE = r"k|K|thousand|grand|m|M|mm|million|bn|billion"
_SCALES = {"k": 1e3, "thousand": 1e3, "grand": 1e3, "m": 1e6, "mm": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9}
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A scheme or www., or a bare host ending in a top-level domain of letters ("peachstatebank.example").
# Bare hosts only with a common top-level domain: "account.Please" (a missing space) is no URL.
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"')\]]+|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*"
                  r"\.(?:com|org|net|gov|edu|io|co|us|info|biz|bank|example)\b(?:/[^\s<>\"')\]]*)?", re.IGNORECASE)
_PHONE = re.compile(r"(?<![\w-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])"
                    r"|(?<![\w-])\d{3}-\d{4}(?![\w-])")
_PERCENT = re.compile(rf"(?<![\w.])({_NUM})\s?(?:%|percent\b|per cent\b)", re.IGNORECASE)
_AMOUNT = re.compile(
    rf"(?:\$|\bUSD\s?)\s?({_NUM})(?:\s?({_SCALE})\b)?"
    rf"|(?<![\w.])({_NUM})\s?({_SCALE})?\s?(?:dollars?|USD|bucks)\b"
    rf"|(?<![\w.])({_NUM})\s?(k|K|grand)\b"
)
_NUMBER = re.compile(rf"(?<![\w.])({_NUM})(?:\s?(thousand|million|billion)\b)?", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^(\s*)\d+[.)](?=\s)", re.MULTILINE)  # "1. Open the app": a list, not a fact
_WORD_NUMBERS = {
    word: value for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split())
} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "ninety": 90, "hundred": 100}
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.IGNORECASE)


class Fact(collections.namedtuple("Fact", "kind value text")):
    """A checkable fact in a text: ``kind`` (one of :data:`FACT_KINDS`), ``value`` normalised
    ("$1,000.00" and "1000 dollars" are both ``amount 1000``) and ``text`` as written. Two facts are
    the same fact when kind and value agree, whatever the text."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, Fact) and (self.kind, self.value) == (other.kind, other.value)

    def __hash__(self):
        return hash((self.kind, self.value))


def _number(text: str, scale: str | None = None) -> str:
    value = float(text.replace(",", "")) * _SCALES.get((scale or "").lower(), 1.0)
    return f"{value:.10g}"


def extract_facts(text: str) -> list[Fact]:
    """The numbers, amounts, percentages, phone numbers, e-mail addresses and URLs of ``text``, in
    the order found (each span counted once: the digits of a phone or an amount are not also a number)."""
    found: list[tuple[int, Fact]] = []
    # Each span found is blanked, so its digits are not found again by the patterns after it.
    chars = list(_LIST_MARKER.sub(lambda m: " " * len(m.group(0)), text))

    def take(match: re.Match, fact: Fact) -> None:
        found.append((match.start(), fact))
        chars[match.start() : match.end()] = " " * (match.end() - match.start())

    def scan(pattern: re.Pattern, make) -> None:
        for match in pattern.finditer("".join(chars)):
            fact = make(match)
            if fact is not None:
                take(match, fact)

    scan(_EMAIL, lambda m: Fact("email", m.group(0).lower().rstrip("."), m.group(0)))
    scan(_URL, _url_fact)
    scan(_PHONE, lambda m: Fact("phone", _phone_digits(m.group(0)), m.group(0)))
    scan(_PERCENT, lambda m: Fact("percent", _number(m.group(1)), m.group(0)))
    scan(_AMOUNT, _amount_fact)
    scan(_NUMBER, lambda m: Fact("number", _number(m.group(1), m.group(2)), m.group(0)))
    return [fact for _, fact in sorted(found, key=lambda item: item[0])]


def _url_fact(match: re.Match) -> Fact | None:
    raw = match.group(0).rstrip(".,;:!?")
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", raw, flags=re.IGNORECASE)
    name, _, path = host.partition("/")
    if not re.search(r"[a-z]", name.split(".")[0], re.IGNORECASE):
        return None  # "3.5x" or a version number, not a host
    return Fact("url", (name.lower() + ("/" + path.rstrip("/") if path.rstrip("/") else "")), raw)


def _phone_digits(text: str) -> str:
    digits = re.sub(r"\D", "", text)
    return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits


def _amount_fact(match: re.Match) -> Fact:
    if match.group(1) is not None:
        return Fact("amount", _number(match.group(1), match.group(2)), match.group(0))
    if match.group(3) is not None:
        return Fact("amount", _number(match.group(3), match.group(4)), match.group(0))
    return Fact("amount", _number(match.group(5), match.group(6)), match.group(0))


def facts_in(texts: Sequence[str]) -> set[Fact]:
    """Every fact of ``texts`` (what an answer may state), plus the numbers written as words
    ("three business days" supports "3 business days")."""
    support: set[Fact] = set()
    for text in texts:
        support.update(extract_facts(text))
        support.update(Fact("number", f"{_WORD_NUMBERS[w.lower()]}", w) for w in _WORD_NUMBER.findall(text))
    return support


def unsupported_facts(answer: str, support: set[Fact]) -> list[Fact]:
    """The facts of ``answer`` found nowhere in ``support`` (:func:`facts_in` of the prompt and the catalog).

    A bare number is supported by the same value of any kind ("25" by "$25"); an amount, a
    percentage, an address or a URL only by the same kind and value; a phone number also by a
    longer one that ends with it ("555-0142" by "1-800-555-0142").
    """
    values = {fact.value for fact in support if fact.kind in ("amount", "percent", "number")}
    phones = [fact.value for fact in support if fact.kind == "phone"]
    missing = []
    for fact in extract_facts(answer):
        if fact.kind == "number":
            ok = fact.value in values
        elif fact.kind == "phone":
            ok = any(phone.endswith(fact.value) for phone in phones)
        else:
            ok = fact in support
        if not ok:
            missing.append(fact)
    return missing
