"""Test-set evaluation in exactly the served configuration: the base model, an adapter, or a
few-shot prompt of the base, scored by label F1, answer F1, ROUGE-L, BLEU, latency and length.

Answers are generated the way the server generates them (the serve config's quantization, chat
template, system prompt, the references serving would put in the prompt, the adapter's topic hints,
``max_new_tokens`` and ``repetition_penalty``), greedily, in left-padded batches, or on CUDA without a
repetition penalty all at once through transformers' continuous batching (:func:`continuous_batching`). References come
from an :class:`EvalIndex` of the snapshot's train rows and the catalog, never from a test row. The 4-bit base is loaded once; adapters are attached to it with
peft and switched, so evaluating base, current and candidate costs one model load.

Label F1: an :class:`~evals.labeler.AnswerLabeler`, fitted on the snapshot's training answers and
cached under ``$TUNELOOP_HOME/evals/labelers/``, predicts the product label of each generated answer;
macro F1 against the test labels is the gate metric. Without labels the gate metric is answer F1.
Beside it: ``knn_label_f1`` (the nearest training question's label, the baseline a model must beat)
and ``unsupported_facts`` (the share of answers stating a figure, phone, address or URL that nothing
in the prompt or the catalog states; :func:`evals.metrics.unsupported_facts`).

Three :class:`Runner` implementations: :class:`ModelRunner` (the real model on transformers),
:class:`LlamaCppRunner` (the real model on llama.cpp, when that backend serves) and
:class:`ScriptedRunner` (canned answers, for fast tests of the gate and the pipeline);
:func:`make_runner` picks the one the serve config's ``backend`` names.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from assistant import adapters, paths, progress
from assistant.chat import (answer_from_reference, build_messages, penalty_arguments, resolve_backend, retrieval_for, with_references,
                            without_special_tokens)
from assistant.config import ServeConfig, check
from evals import metrics
from evals.labeler import AnswerLabeler
from feedback import datasets, dedupe, knowledge
from feedback.db import connect

BASE = "base"
CURRENT = "current"


@dataclass
class EvalConfig:
    adapter: str = CURRENT
    """What to evaluate: "current" (the adapter serving now), "base" (no adapter) or an adapter version."""
    dataset: str = ""
    """A snapshot folder (its test split), or a JSONL/CSV file of examples; empty = the latest snapshot."""
    question_col: str = "question"
    """Column of the question in a --dataset file."""
    answer_col: str = "answer"
    """Column of the reference answer in a --dataset file."""
    label_col: str = "label"
    """Column of the product label in a --dataset file; rows without it are scored by answer F1 only."""
    limit: int = 0
    """Evaluate only the first N test examples; 0 = all."""
    batch_size: int = 16
    """Questions generated together (left-padded, greedy)."""
    few_shot_k: int = 3
    """Training examples put in the prompt of the few-shot baseline of the base model."""
    baselines: bool = False
    """Also evaluate the base model and its few-shot prompt beside the chosen adapter."""
    seed: int = 0
    """Seed for choosing the few-shot examples."""

    def __post_init__(self) -> None:
        check(bool(self.adapter.strip()), "adapter must be 'current', 'base' or an adapter version")
        check(self.limit >= 0, "limit must be 0 (all examples) or positive")
        check(1 <= self.batch_size <= 512, "batch_size must be between 1 and 512")
        check(0 <= self.few_shot_k <= 32, "few_shot_k must be between 0 and 32")


@dataclass
class Generation:
    """One generated answer and what it cost."""

    text: str
    latency_s: float
    """Wall time of its batch divided by the batch size."""
    prompt_tokens: int
    tokens_out: int


class Runner(Protocol):
    """Generates answers and measures perplexity on the base model or one of its adapters."""

    def generate(self, conversations: list[list[dict]], adapter: str | None, batch_size: int) -> list[Generation]:
        """Greedy answers to chat-message lists; ``adapter`` None means the base model alone."""
        ...

    def perplexity(self, texts: Sequence[str], adapter: str | None) -> float:
        """Perplexity of the base model (or base + adapter) on plain texts."""
        ...


class ModelRunner:
    """The served model: base loaded once (4-bit as served), adapters attached with peft."""

    def __init__(self, serve: ServeConfig, continuous: bool | None = None):
        from assistant import model as base_model

        self.serve = serve
        self.base = base_model.prepare(serve.base_model)
        self.tokenizer, self.model = base_model.load_base(self.base, serve.quantization, serve.device)
        self.peft = None
        # None = where it pays and answers as served: on CUDA, without a repetition penalty.
        self.continuous = continuous_batching(self.model, serve) if continuous is None else continuous
        if self.continuous and serve.repetition_penalty != 1.0:
            raise ValueError("continuous batching drops the repetition penalty; it would not score what is served "
                             f"(repetition_penalty = {serve.repetition_penalty})")

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator:
        if adapter is None:
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        folder = adapters.adapter_path(adapter)
        adapters.validate(folder, self.base.model_id, self.base.sha256)
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=adapter, is_trainable=False)
        elif adapter not in self.peft.peft_config:
            self.peft.load_adapter(str(folder), adapter_name=adapter, is_trainable=False)
        self.peft.set_adapter(adapter)
        self.peft.eval()
        yield self.peft

    def generate(self, conversations: list[list[dict]], adapter: str | None, batch_size: int) -> list[Generation]:
        import torch

        out: list[Generation] = []
        eos = self.tokenizer.eos_token_id
        hints = adapters.load_hints(adapters.adapter_path(adapter)) if adapter is not None else None
        if hints is not None:
            # As served: the adapter's topic hints in each system message (assistant.hints).
            conversations = hints.apply(conversations)
        with self._active(adapter) as model, torch.no_grad():
            if self.continuous:
                return self._generate_continuous(model, conversations)
            for start in range(0, len(conversations), batch_size):
                batch = conversations[start : start + batch_size]
                # The served prompt (same chat template call as TransformersBackend), padded on the
                # left so every answer starts right after its own prompt.
                self.tokenizer.padding_side = "left"
                inputs = self.tokenizer.apply_chat_template(
                    [without_special_tokens(messages, self.tokenizer) for messages in batch], add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
                ).to(model.device)
                started = time.perf_counter()
                output = model.generate(
                    **inputs,
                    max_new_tokens=self.serve.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    **penalty_arguments(self.serve, inputs["input_ids"].shape[1]),
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                share = (time.perf_counter() - started) / len(batch)
                prompt_len = inputs["input_ids"].shape[1]
                for row, mask in zip(output, inputs["attention_mask"]):
                    new = row[prompt_len:].tolist()
                    # Tokens up to and including the end-of-turn token; the rest is padding.
                    length = new.index(eos) + 1 if eos in new else len(new)
                    text = self.tokenizer.decode(new[:length], skip_special_tokens=True).strip()
                    out.append(Generation(text, share, int(mask.sum()), length))
        return out

    def _generate_continuous(self, model, conversations: list[list[dict]]) -> list[Generation]:
        """Every conversation at once through transformers' continuous batching (``generate_batch``:
        a paged KV cache, requests joining and leaving the running batch, CUDA graphs on a GPU): the
        same prompts and greedy tokens as the padded batches, without their padding or their wait for
        a batch's longest answer. A PEFT adapter applies, as it does in ``generate``."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        prompts = [self.tokenizer.apply_chat_template(without_special_tokens(messages, self.tokenizer),
                                                      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                   for messages in conversations]
        eos = self.tokenizer.eos_token_id
        settings = GenerationConfig(max_new_tokens=self.serve.max_new_tokens, do_sample=False, eos_token_id=eos,
                                    pad_token_id=self.tokenizer.pad_token_id)
        # On CUDA transformers sizes the paged cache from free memory; on a CPU (tests, the benchmark's
        # tiny mode) a fixed small cache, or it would reserve a share of the machine's RAM.
        sizing = None if model.device.type == "cuda" else ContinuousBatchingConfig(
            num_blocks=max(4, len(prompts) * 2), max_batch_tokens=1024)
        started = time.perf_counter()
        outputs = model.generate_batch(prompts, generation_config=settings, continuous_batching_config=sizing,
                                       warmup=model.device.type == "cuda")
        share = (time.perf_counter() - started) / max(len(prompts), 1)
        failed = [output.error for output in outputs.values() if output.error]
        if len(outputs) != len(prompts) or failed:
            raise RuntimeError(f"continuous batching answered {len(outputs)} of {len(prompts)} questions"
                               + (f": {failed[0]}" if failed else ""))
        out = []
        for prompt, output in zip(prompts, outputs.values()):  # in submission order (generate_batch reorders)
            new = list(output.generated_tokens)
            length = new.index(eos) + 1 if eos in new else len(new)
            out.append(Generation(self.tokenizer.decode(new[:length], skip_special_tokens=True).strip(), share,
                                  len(prompt), length))
        return out

    def perplexity(self, texts: Sequence[str], adapter: str | None) -> float:
        with self._active(adapter) as model:
            return metrics.perplexity(model, self.tokenizer, texts)


def continuous_batching(model, serve: ServeConfig) -> bool:
    """Whether :class:`ModelRunner` generates through continuous batching: on CUDA, where it pays
    (docs/results.md, "Training on a GPU"), and only without a repetition penalty, which
    transformers' continuous batching drops (it would score answers customers never get)."""
    return model.device.type == "cuda" and serve.repetition_penalty == 1.0 and hasattr(model, "generate_batch")


class LlamaCppRunner:
    """The served model on llama.cpp (``backend = "llama_cpp"``): the same
    :class:`~assistant.llama_backend.LlamaCppBackend` the server runs, adapters switched on one
    loaded base, every question of a call decoded together by its batched engine."""

    def __init__(self, serve: ServeConfig):
        from assistant.llama_backend import LlamaCppBackend

        self.serve = serve
        # Every question of a call is submitted at once: room for 16 to be decoded together.
        self.backend = LlamaCppBackend(dataclasses.replace(serve, concurrency=max(serve.concurrency, 16)))
        self.tokenizer = self.backend.tokenizer

    def generate(self, conversations: list[list[dict]], adapter: str | None, batch_size: int) -> list[Generation]:
        self.backend.use(adapter)
        if self.backend.hints is not None:
            conversations = self.backend.hints.apply(conversations)
        prompts = [self.backend.prompt_ids(messages) for messages in conversations]
        started = time.perf_counter()
        answers = self.backend.generate_ids(prompts)
        share = (time.perf_counter() - started) / max(len(prompts), 1)
        return [Generation(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), share, len(prompt), len(tokens))
                for prompt, tokens in zip(prompts, answers)]

    def perplexity(self, texts: Sequence[str], adapter: str | None) -> float:
        self.backend.use(adapter)
        return self.backend.perplexity(texts)


def make_runner(serve: ServeConfig) -> Runner:
    """The runner of the backend ``serve`` names: the gate scores what customers get."""
    return LlamaCppRunner(serve) if resolve_backend(serve) == "llama_cpp" else ModelRunner(serve)


@dataclass
class ScriptedRunner:
    """Canned answers for fast tests: ``answer(adapter, question) -> str`` and a perplexity per adapter."""

    answer: Callable[[str | None, str], str]
    perplexities: dict = field(default_factory=dict)

    def generate(self, conversations: list[list[dict]], adapter: str | None, batch_size: int) -> list[Generation]:
        return [
            Generation(self.answer(adapter, messages[-1]["content"]), 0.001, sum(len(m["content"].split()) for m in messages), 8)
            for messages in conversations
        ]

    def perplexity(self, texts: Sequence[str], adapter: str | None) -> float:
        return float(self.perplexities.get(adapter, 10.0))


# --- test data -----------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """The examples to score and where they came from."""

    name: str
    """Dataset version (``d0003``) or file name."""
    examples: list[dict]
    """Rows ``{"id", "question", "answer", "label"}``; ``label`` may be None."""
    train: list[dict]
    """Training rows of the same snapshot (labeler fit, few-shot examples, references); may be empty."""
    catalog: list[dict] = field(default_factory=list)
    """The home's catalog passages ``{"question", "answer", "label"}``: references as served, and facts answers may state."""
    _index: EvalIndex | None = field(default=None, init=False, repr=False, compare=False)

    def index(self) -> EvalIndex:
        """The references index of this test set, built on first use and shared by every system evaluated on it."""
        if self._index is None:
            self._index = EvalIndex.build(self)
        return self._index


@dataclass
class EvalIndex:
    """What answers are grounded on at evaluation: the train rows and the catalog, never a test row.

    Serving searches the live knowledge table, which staff change while an evaluation runs and which
    holds corrections of test questions; evaluation searches a :class:`~feedback.knowledge.MemoryIndex`
    of what serving would hold of this snapshot instead: its train rows (staff corrections and approvals
    in train included, customer thumbs-ups no staff member approved left out, as
    :func:`feedback.knowledge.sync` leaves them out) and the catalog passages. A train row with a test
    row's id or question is left out too, so no test question finds itself (a ``--dataset`` file is
    scored against the latest snapshot's train split, which may hold its questions).
    """

    index: knowledge.MemoryIndex
    entry_ids: list
    """Per entry: the train row's id, or ``"catalog"``."""
    query_vectors: np.ndarray
    """One unit row per test question."""
    knn_labels: list[str] | None
    """Per test question, the label of the nearest labelled train row; None without labels on both sides."""
    catalog_facts: set
    """Every fact (:func:`evals.metrics.facts_in`) of the catalog passages."""

    @classmethod
    def build(cls, test: EvalSet) -> EvalIndex:
        test_ids = {str(row.get("id")) for row in test.examples}
        test_questions = {dedupe.question_hash(row["question"]) for row in test.examples}
        train = [row for row in test.train if row.get("source") != "thumbs_up"
                 and str(row.get("id")) not in test_ids and dedupe.question_hash(row["question"]) not in test_questions]
        entries = ([(row["question"], row["answer"], row.get("label"), "dataset") for row in train]
                   + [(row["question"], row["answer"], row.get("label"), "catalog") for row in test.catalog])
        catalog_facts = metrics.facts_in([row["answer"] for row in test.catalog])
        if not entries:
            # Nothing to find, so nothing to embed: the query vectors only give each question its (empty) list.
            return cls(knowledge.MemoryIndex([], np.zeros((0, knowledge.DIMENSIONS))), [],
                       np.zeros((len(test.examples), knowledge.DIMENSIONS), dtype=np.float32), None, catalog_facts)
        # Cached by question as curation cached them; nothing is written from an evaluation.
        cache = dedupe.EmbeddingCache(connect(), persist=False)
        vectors = cache.vectors([entry[0] for entry in entries])
        queries = cache.vectors([row["question"] for row in test.examples])
        labelled = [i for i, row in enumerate(train) if row.get("label") not in (None, "")]
        knn_labels = None
        if labelled and all(row.get("label") is not None for row in test.examples):
            _, nearest = dedupe.nearest(queries, vectors[labelled])
            knn_labels = [str(train[labelled[j]]["label"]) for j in nearest]
        return cls(knowledge.MemoryIndex(entries, vectors), [row.get("id") for row in train] + ["catalog"] * len(test.catalog),
                   queries, knn_labels, catalog_facts)

    def references(self, k: int, min_score: float) -> list[list[knowledge.Reference]]:
        """Per test question, the ``k`` entries with similarity >= ``min_score``, best first."""
        return self.index.search(self.query_vectors, k, min_score)


def retrieval_settings(adapter: str | None, serve: ServeConfig) -> dict | None:
    """``{"k", "min_score"}`` that serving uses for ``adapter`` (None = the base model), decided by
    :func:`assistant.chat.retrieval_for`; None means no references."""
    k, min_score = retrieval_for(adapter, serve)
    return {"k": k, "min_score": min_score} if k else None


def load_test_set(cfg: EvalConfig) -> EvalSet:
    """The test examples ``cfg`` names, limited to ``cfg.limit``, with their snapshot's train split."""
    target = Path(cfg.dataset).expanduser() if cfg.dataset else datasets.latest_snapshot()
    if target is None:
        raise datasets.DatasetError("no dataset snapshot yet: run `tuneloop retrain` (it curates one) or pass --dataset FILE")
    if not target.exists():
        raise datasets.DatasetError(f"{target} does not exist")
    if target.is_dir():
        examples = datasets.load_split(target, "test")
        train = datasets.load_split(target, "train")
        name = target.name
    else:
        examples = _read_file(target, cfg)
        latest = datasets.latest_snapshot()
        train = datasets.load_split(latest, "train") if latest else []
        name = target.name
    if cfg.limit:
        examples = examples[: cfg.limit]
    if not examples:
        raise datasets.DatasetError(f"{target}: no test examples to evaluate")
    catalog = [{key: row[key] for key in ("question", "answer", "label")}
               for row in knowledge.entries(connect()) if row["source"] == "catalog"]
    return EvalSet(name, examples, train, catalog)


def _read_file(file: Path, cfg: EvalConfig) -> list[dict]:
    """Rows of a CSV or JSONL test file; a bad encoding, line or row fails naming the file and row."""
    try:
        if file.suffix.lower() == ".csv":
            with open(file, newline="", encoding="utf-8") as handle:
                raw = list(csv.DictReader(handle))
        else:
            raw = []
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except ValueError as exc:
                        raise datasets.DatasetError(f"{file}:{number}: not JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise datasets.DatasetError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = []
    for number, row in enumerate(raw, start=1):
        if not isinstance(row, dict):
            raise datasets.DatasetError(f"{file}: row {number} is not an object")
        question, answer = row.get(cfg.question_col), row.get(cfg.answer_col)
        if not question or not answer:
            raise datasets.DatasetError(f"{file}: row {number} lacks {cfg.question_col!r} or {cfg.answer_col!r}")
        label = row.get(cfg.label_col)
        rows.append({"id": row.get("id", number), "question": str(question), "answer": str(answer),
                     "label": None if label in (None, "") else str(label)})
    return rows


def few_shot_examples(train: list[dict], k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` (question, answer) pairs from the training split, one per label while labels last."""
    rng = random.Random(seed)
    shuffled = train[:]
    rng.shuffle(shuffled)
    picked, labels = [], set()
    for row in shuffled:
        if len(picked) < k and row.get("label") not in labels:
            picked.append(row)
            labels.add(row.get("label"))
    picked += [row for row in shuffled if row not in picked][: k - len(picked)]
    return [(row["question"], row["answer"]) for row in picked]


def labeler_for(test: EvalSet) -> AnswerLabeler | None:
    """The answer labeler fitted on the train answers (or, for a file without a snapshot, the
    file's own reference answers), cached by a hash of what it was fitted on; None without labels."""
    if any(row.get("label") is None for row in test.examples):
        return None
    source = [r for r in test.train if r.get("label")] or test.examples
    pairs = sorted((r["answer"], str(r["label"])) for r in source)
    if len({label for _, label in pairs}) < 2:
        return None
    key = paths.sha256_text(json.dumps(pairs))[:16]
    folder = paths.home() / "evals" / "labelers" / key
    if (folder / "labeler.json").exists():
        return AnswerLabeler.load(folder)
    labeler = AnswerLabeler().fit([a for a, _ in pairs], [lab for _, lab in pairs])
    labeler.save(folder)
    return labeler


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """One system's scores on one test set: what the gate compares, the report draws, the review
    samples and ``tuneloop eval --json`` prints. Stored as :meth:`to_json` (``eval_reports.report``,
    an adapter's ``eval_report.json``) and read back with :meth:`from_json`."""

    adapter: str | None
    """The adapter version evaluated; None for the base model (alone or few-shot)."""
    dataset: str
    """Dataset version (``d0003``) or file name of the test set."""
    n: int
    """Test examples scored."""
    answer_f1: float
    """Mean token F1 of each answer against its reference."""
    rouge_l: float
    bleu: float
    latency_s: float
    """Seconds per answer (batched generation)."""
    tokens_per_answer: float
    prompt_tokens: float
    """Mean prompt length in tokens (few-shot prompts are longer)."""
    few_shot_k: int
    label_f1: float | None
    """Macro F1 of the labels the labeler reads off the answers; None without labels."""
    label_precision: float | None
    """Macro precision of those labels; None without labels (or in reports stored before it was)."""
    label_recall: float | None
    per_label: dict
    """Label -> precision, recall, F1 and support (empty without labels)."""
    confusions: list
    """The most frequent ``{"true", "predicted", "count"}`` mistakes."""
    perplexity: float | None
    """Perplexity on the gate's general text; None when not measured."""
    metric: str
    """The gate metric: "label_f1" when the test set has labels, else "answer_f1"."""
    f1: float
    """The gate metric's value."""
    f1_ci: list[float] | None
    """95% bootstrap interval of ``f1`` over the test examples, ``[low, high]``; None in reports stored before it was."""
    retrieval: dict | None = None
    """References in each prompt, ``{"k", "min_score"}`` as served to this system; None: none (or a report stored before references)."""
    knn_label_f1: float | None = None
    """Macro F1 of the nearest training question's label: the baseline a model must beat; None without labels."""
    unsupported_facts: float | None = None
    """Share of answers stating a number, amount, percentage, phone, e-mail or URL found in none of the references, catalog, persona or question."""
    examples: list[dict] = field(default_factory=list)
    """Per test example: ``id``, ``question``, ``reference``, ``label``, ``answer``, ``predicted_label``, ``answer_f1``,
    ``references`` (``[{"id", "score"}]``) and ``unsupported`` (the unsupported facts as written)."""
    baselines: dict[str, EvalReport] = field(default_factory=dict)
    """``tuneloop eval --baselines``: the base model's and its few-shot prompt's reports."""

    def to_json(self, examples: bool = True) -> dict[str, Any]:
        """The report as JSON, keys as stored and printed since reports were dicts; ``examples=False``
        leaves out the per-example rows (printing, ``eval_report.json``). ``baselines`` appears only
        when there are some, always without their rows."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("examples", "baselines")}
        if examples:
            data["examples"] = self.examples
        if self.baselines:
            data["baselines"] = {role: report.to_json(examples=False) for role, report in self.baselines.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        """A stored report back (with or without its rows). Figures added since the first reports
        (label precision and recall, ``f1_ci``, retrieval, ``knn_label_f1``, ``unsupported_facts``)
        read as None in reports stored before them."""
        values = {"label_precision": None, "label_recall": None, "f1_ci": None} | data
        baselines = {role: cls.from_json(value) for role, value in values.pop("baselines", {}).items()}
        return cls(**values, baselines=baselines)


def evaluate(
    runner: Runner,
    test: EvalSet,
    adapter: str | None,
    serve: ServeConfig,
    labeler: AnswerLabeler | None,
    shots: list[tuple[str, str]] | None = None,
    batch_size: int = 16,
    general_texts: Sequence[str] | None = None,
    stages: progress.StageProgress | None = None,
) -> EvalReport:
    """Generate and score answers of ``adapter`` (None = base) on ``test``; returns the report.

    Each prompt holds the references serving would give this system (:func:`retrieval_settings`),
    found in the test set's :class:`EvalIndex`; a few-shot prompt holds its ``shots`` instead. The
    gate metric ``f1`` is label F1 when the test set has labels, else answer F1; ``perplexity`` is
    measured on ``general_texts`` when given. ``stages`` shows answering and scoring as two stages.
    """
    index = test.index()
    retrieval = None if shots else retrieval_settings(adapter, serve)
    found = index.references(retrieval["k"], retrieval["min_score"]) if retrieval else [[] for _ in test.examples]
    conversations = [with_references(build_messages(serve.system_prompt, list(shots or []), row["question"]), refs)
                     for row, refs in zip(test.examples, found)]
    # As served: a near-certain match to an approved question is answered with its approved text.
    approved = [answer_from_reference(refs, serve) for refs in found]
    asked = [messages for messages, ref in zip(conversations, approved) if ref is None]
    system = adapter or ("the base model with a few-shot prompt" if shots else "the base model")
    if stages is not None:
        stages.start(f"answering {len(asked)} test questions as {system}", count=len(asked), unit="question")
    generated = iter(_answers(runner, asked, adapter, batch_size, stages) if asked else [])
    generations = [next(generated) if ref is None else Generation(ref.answer, 0.0, 0, 0) for ref in approved]
    if stages is not None:
        stages.start(f"scoring the answers of {system}")
    answers = [g.text for g in generations]
    references = [row["answer"] for row in test.examples]
    truth = [row.get("label") for row in test.examples]
    per_example_f1 = [metrics.answer_f1(a, r) for a, r in zip(answers, references)]
    predicted = labeler.predict(answers) if labeler else [None] * len(answers)
    scores = metrics.label_scores(truth, predicted) if labeler else None
    answer_f1 = sum(per_example_f1) / len(per_example_f1)
    # What the answer could have taken its facts from: the prompt (persona, references, shots, the
    # question) and the catalog.
    unsupported = [metrics.unsupported_facts(answer, index.catalog_facts | metrics.facts_in([m["content"] for m in messages]))
                   for answer, messages in zip(answers, conversations)]
    knn_f1 = metrics.macro_f1(truth, index.knn_labels) if index.knn_labels else None
    # How far the gate metric could move on another draw of as many questions (on the pack's 115
    # test questions the interval of label F1 is about 0.14 wide), so one figure is read with its noise.
    if labeler:
        interval = metrics.bootstrap_interval(metrics.macro_f1, truth, predicted)
    else:
        interval = metrics.bootstrap_interval(metrics.mean_score, None, per_example_f1)
    return EvalReport(
        adapter=adapter,
        dataset=test.name,
        n=len(answers),
        answer_f1=answer_f1,
        rouge_l=metrics.rouge_l(answers, references),
        bleu=metrics.bleu(answers, references),
        latency_s=sum(g.latency_s for g in generations) / len(generations),
        tokens_per_answer=sum(g.tokens_out for g in generations) / len(generations),
        prompt_tokens=sum(g.prompt_tokens for g in generations) / len(generations),
        few_shot_k=len(shots or []),
        label_f1=scores["f1"] if scores else None,
        label_precision=scores["precision"] if scores else None,
        label_recall=scores["recall"] if scores else None,
        per_label=scores["per_label"] if scores else {},
        confusions=scores["confusions"] if scores else [],
        perplexity=runner.perplexity(general_texts, adapter) if general_texts else None,
        metric="label_f1" if labeler else "answer_f1",
        f1=scores["f1"] if scores else answer_f1,
        f1_ci=[interval["ci_low"], interval["ci_high"]],
        retrieval=retrieval,
        knn_label_f1=knn_f1,
        unsupported_facts=sum(bool(facts) for facts in unsupported) / len(unsupported),
        examples=[
            {"id": row.get("id"), "question": row["question"], "reference": row["answer"], "label": row.get("label"),
             "answer": answer, "predicted_label": label, "answer_f1": score,
             "references": [{"id": index.entry_ids[r.id], "score": round(r.score, 4)} for r in refs],
             "unsupported": [fact.text for fact in facts]}
            for row, answer, label, score, refs, facts in zip(test.examples, answers, predicted, per_example_f1, found, unsupported)
        ],
    )


def _answers(runner: Runner, conversations: list[list[dict]], adapter: str | None, batch_size: int,
             stages: progress.StageProgress | None) -> list[Generation]:
    """The runner's answers, in one call; batch by batch while a bar counts them, which only a
    terminal shows (llama.cpp then decodes ``batch_size`` questions together instead of all)."""
    if stages is None or not stages.counting:
        return runner.generate(conversations, adapter, batch_size)
    answers: list[Generation] = []
    for start in range(0, len(conversations), batch_size):
        batch = runner.generate(conversations[start : start + batch_size], adapter, batch_size)
        stages.advance(len(batch))
        answers += batch
    return answers


def resolve_adapter(name: str) -> str | None:
    """``"current"`` -> the version serving now (None when the base serves), ``"base"`` -> None."""
    if name == BASE:
        return None
    if name == CURRENT:
        return adapters.current_version()
    if name not in adapters.list_versions():
        known = ", ".join(adapters.list_versions()) or "none yet"
        raise adapters.AdapterError(f"no adapter {name!r} (adapters: {known}; or use current / base)")
    return name


def main(cfg: EvalConfig, serve: ServeConfig, runner: Runner | None = None) -> EvalReport:
    """Evaluate one adapter (and, with ``cfg.baselines``, the base and its few-shot prompt) in the
    served configuration ``serve``, as the caller resolved it."""
    systems = 3 if cfg.baselines else 1
    with progress.stages("tuneloop eval", 2 + 2 * systems) as stages:
        stages.start("reading the test set")
        test = load_test_set(cfg)
        adapter = resolve_adapter(cfg.adapter)
        labeler = labeler_for(test)
        stages.start(f"loading the model {serve.base_model}")
        runner = runner or make_runner(serve)
        report = evaluate(runner, test, adapter, serve, labeler, batch_size=cfg.batch_size, stages=stages)
        if cfg.baselines:
            report.baselines = {
                BASE: evaluate(runner, test, None, serve, labeler, batch_size=cfg.batch_size, stages=stages),
                "few_shot": evaluate(runner, test, None, serve, labeler,
                                     few_shot_examples(test.train, cfg.few_shot_k, cfg.seed), cfg.batch_size,
                                     stages=stages),
            }
    return report


def record_report(db, report: EvalReport, role: str, run_id: int | None = None) -> int:
    """Store a report in ``eval_reports`` (``role``: base, current, candidate, few_shot or manual).

    The one writer of that table."""
    return db["eval_reports"].insert(
        {
            "run_id": run_id,
            "role": role,
            "adapter": report.adapter,
            "dataset": report.dataset,
            "n": report.n,
            "f1": report.f1,
            "label_f1": report.label_f1,
            "answer_f1": report.answer_f1,
            "rouge_l": report.rouge_l,
            "bleu": report.bleu,
            "latency_s": report.latency_s,
            "tokens_per_answer": report.tokens_per_answer,
            "prompt_tokens": report.prompt_tokens,
            "perplexity": report.perplexity,
            "report": json.dumps(report.to_json()),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    ).last_pk
