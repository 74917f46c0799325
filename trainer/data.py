"""Training data: read a dataset snapshot, encode each row through the chat template, pad batches.

A snapshot is ``$TUNELOOP_HOME/datasets/<version>/`` (``d0001``, ``d0002``, ...) holding
``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (rows ``{"id", "question", "answer", "label",
"source"}``) and ``manifest.json``, written by :mod:`feedback.curate`; the latest is found by
:func:`feedback.datasets.latest_snapshot`. Rows are validated by
:func:`feedback.datasets.load_split`, so a hand-made or damaged snapshot fails with the file and
line rather than deep inside training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from assistant import paths
from assistant.chat import build_messages, with_references, without_special_tokens
from assistant.hints import TopicHints, with_hint
from feedback import datasets, dedupe, packs
from feedback.datasets import SPLITS, DatasetError, load_split  # noqa: F401  (the trainer's names for them)

IGNORE = -100
"""Label value the loss skips (PyTorch's cross-entropy ``ignore_index``)."""


@dataclass(frozen=True)
class Snapshot:
    """A dataset snapshot on disk and what identifies it."""

    version: str
    """Folder name, e.g. ``d0003``."""
    path: Path
    """The snapshot folder."""
    manifest: dict
    """Parsed ``manifest.json``."""
    manifest_sha256: str
    """Hash of the manifest file's bytes."""


def latest_snapshot() -> Path:
    """The highest-numbered snapshot folder that holds a manifest."""
    found = datasets.latest_snapshot()
    if found is None:
        raise DatasetError(f"no dataset snapshot under {paths.datasets_dir()}; run `tuneloop curate` first, or pass --dataset PATH")
    return found


def open_snapshot(dataset: str = "") -> Snapshot:
    """The snapshot at ``dataset`` (a folder), or the latest one when empty."""
    folder = Path(dataset).expanduser() if dataset else latest_snapshot()
    manifest_file = folder / "manifest.json"
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    if not manifest_file.is_file():
        raise DatasetError(f"{folder} is not a dataset snapshot: manifest.json is missing")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DatasetError(f"{manifest_file} is not JSON ({exc})") from exc
    return Snapshot(folder.name, folder.resolve(), manifest, paths.sha256_file(manifest_file))


def encode_example(tokenizer, system_prompt: str, question: str, answer: str, hint: str = "",
                   references: list | tuple = ()) -> dict:
    """Token ids of one chat (the served prompt + the answer) with the loss on the answer only.

    Labels are ``IGNORE`` up to the assistant's content and after its end-of-turn token, so the
    model learns the answer and when to stop, never the persona, the topic hint or the question.
    """
    # Control-token strings are removed from the texts exactly as the server removes them from chats.
    # References, then the hint, in the system message: the order serving puts them in.
    prompt_messages = with_hint(with_references(build_messages(system_prompt, [], question), list(references)), hint)
    messages = without_special_tokens(prompt_messages + [{"role": "assistant", "content": answer}], tokenizer)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages, return_dict=False)
    if full[: len(prompt)] != prompt:
        raise DatasetError("the chat template renders the prompt differently with an answer; cannot mask the loss")
    completion = full[len(prompt) :]
    # ChatML-style templates end the turn with the eos token (<|im_end|> for SmolLM2) and then a
    # newline the model never generates: the loss stops at the end-of-turn token.
    try:
        end = completion.index(tokenizer.eos_token_id) + 1
    except ValueError:
        raise DatasetError(f"the chat template does not end the assistant turn with {tokenizer.eos_token!r}") from None
    ids = prompt + completion[:end]
    labels = [IGNORE] * len(prompt) + completion[:end]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_rows(tokenizer, system_prompt: str, rows: list[dict], max_length: int,
                hints: list[str] | None = None, references: list[list] | None = None) -> tuple[list[dict], int]:
    """Encoded examples of ``rows`` (with ``hints[i]`` and ``references[i]`` in row i's system
    message) and how many were skipped for exceeding ``max_length``."""
    hints = hints or [""] * len(rows)
    references = references or [[] for _ in rows]
    encoded = [encode_example(tokenizer, system_prompt, str(r["question"]).strip(), str(r["answer"]).strip(), hint, refs)
               for r, hint, refs in zip(rows, hints, references, strict=True)]
    kept = [e for e in encoded if len(e["input_ids"]) <= max_length]
    return kept, len(encoded) - len(kept)


class TrainingReference(NamedTuple):
    """A reference in a training prompt: what :func:`assistant.chat.with_references` shows."""

    question: str
    answer: str
    score: float
    row: int
    """Index of the pool row it came from."""


def draw_references(pool: list[dict], pool_vectors: np.ndarray, queries: list[dict], query_vectors: np.ndarray,
                    k: int, min_score: float, distractors: float = 0.0, missing: float = 0.0, seed: int = 0,
                    cluster_threshold: float = dedupe.NEAR_DUPLICATE_THRESHOLD) -> list[list[TrainingReference]]:
    """The references of each query row, drawn from ``pool`` the way serving draws them: the ``k``
    nearest questions with cosine >= ``min_score``, best first.

    Never the row itself, a noisy copy of it (same id) or a paraphrase from its own cluster
    (connected components at ``cluster_threshold``, as curation's dedupe): shown those, the model
    would learn to copy the answer it is being taught. As in RAFT, a ``missing`` share of rows gets
    no references and a ``distractors`` share gets ``k`` rows of other clusters picked at random
    (wrong references), so the model learns to answer without them and to ignore bad ones.
    Vectors are unit rows (``dedupe.EmbeddingCache``); similarities go a block of rows at a time.
    """
    if k <= 0 or not queries:
        return [[] for _ in queries]
    rng = random.Random(seed)
    clusters = dedupe.components(np.concatenate([pool_vectors, query_vectors]), cluster_threshold)
    pool_clusters, query_clusters = clusters[: len(pool)], clusters[len(pool):]
    pool_ids = np.asarray([str(r.get("id")) for r in pool], dtype=object)
    out: list[list[TrainingReference]] = []
    for start in range(0, len(queries), 512):
        sims = query_vectors[start : start + 512] @ pool_vectors.T
        for offset, row_sims in enumerate(sims):
            i = start + offset
            banned = (pool_clusters == query_clusters[i]) | (pool_ids == str(queries[i].get("id")))
            allowed = np.nonzero(~banned)[0]
            draw = rng.random()
            if draw < missing or not len(allowed):
                picked = []
            elif draw < missing + distractors:
                picked = sorted(rng.sample(allowed.tolist(), min(k, len(allowed))), key=lambda j: -row_sims[j])
            else:
                scores = np.where(banned, -np.inf, row_sims)
                picked = [j for j in np.argsort(-scores, kind="stable")[:k].tolist() if scores[j] >= min_score]
            out.append([TrainingReference(str(pool[j]["question"]).strip(), str(pool[j]["answer"]).strip(),
                                          float(row_sims[j]), j) for j in picked])
    return out


def labels_of(rows: list[dict]) -> set[str]:
    """The distinct labels of ``rows`` (rows without one are not counted)."""
    return {str(r["label"]) for r in rows if r.get("label") not in (None, "")}


def topic_hints(train_rows: list[dict], val_rows: list[dict], k: int, seed: int,
                folds: int = 5) -> tuple[TopicHints, list[str], list[str]]:
    """The adapter's topic hints (a question classifier fitted on every labelled training row), and
    the hint of each training and validation row.

    A training row's hint comes from a classifier fitted on the other folds, never on the row
    itself: fitted on everything, the classifier would name the right label first for nearly every
    training question, and the model would learn to copy the first label, which in service is
    wrong for about one question in six. Unlabelled rows get the full classifier's hint. (With
    ``augment``, a noisy copy can land in another fold than its original, whose classifier then
    saw a near-copy of it; the two are not measured together.)
    """
    from sklearn.model_selection import StratifiedKFold

    question = [str(r["question"]).strip() for r in train_rows]
    labelled = [i for i, r in enumerate(train_rows) if r.get("label") not in (None, "")]  # as in labels_of
    labels = [str(train_rows[i]["label"]) for i in labelled]
    if len(set(labels)) < 2:
        raise DatasetError(f"topic hints need labelled training questions with at least two labels; the training split "
                           f"has {len(labelled)} labelled rows and {len(set(labels))} labels (set hints = 0)")
    full = TopicHints.fit([question[i] for i in labelled], labels, k)
    unlabelled = sorted(set(range(len(question))) - set(labelled))
    hints = [""] * len(question)
    for i, hint in zip(unlabelled, full.hints([question[i] for i in unlabelled])):
        hints[i] = hint
    # Fewer folds when a label has fewer rows than folds (each fold then still sees most labels).
    splits = max(2, min(folds, min(labels.count(label) for label in set(labels))))
    for fit, held in StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed).split(labelled, labels):
        part = TopicHints.fit([question[labelled[j]] for j in fit], [labels[j] for j in fit], k)
        for j, hint in zip(held, part.hints([question[labelled[j]] for j in held])):
            hints[labelled[j]] = hint
    return full, hints, full.hints([str(r["question"]).strip() for r in val_rows])


@dataclass
class PadCollator:
    """Pads a batch to its longest example (or to ``pad_to``); padded labels are ``IGNORE``."""

    pad_id: int
    """Token id used for padding (masked out by the attention mask and the labels)."""
    pad_to: int | None = None
    """Pad every batch to this length instead (the naive baseline of the benchmark)."""
    share_prefix: bool = False
    """Split off the tokens every example of the batch starts with (see :func:`shared_prefix_length`)."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            gap = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * gap)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * gap)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * gap)
        if any(f.get("distil") for f in features):
            # Rows whose loss is the KL from the base model (trainer.replay); the others keep cross-entropy.
            batch["distil"] = [int(bool(f.get("distil"))) for f in features]
        shared = shared_prefix_length(features) if self.share_prefix else 0
        if shared:
            # The model runs the prefix once and the rest of each row on its cache; the attention
            # mask keeps its full width (prefix + rest), so positions and token counts are unchanged.
            batch["prefix_ids"] = [batch["input_ids"][0][:shared]]
            batch["input_ids"] = [row[shared:] for row in batch["input_ids"]]
            batch["labels"] = [row[shared:] for row in batch["labels"]]
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def shared_prefix_length(features: list[dict]) -> int:
    """How many leading tokens every example of a batch has in common and can compute once.

    Every training example starts with the same system prompt (133 of ~200 tokens on the shipped
    pack), so a batch of 8 spends most of its compute on 8 copies of the same prefix. The prefix
    stops before the first answer token's predecessor: the position that predicts an answer token
    must be computed per row, so the loss of the rest alone equals the loss of the whole batch.
    """
    first, *others = [list(f["input_ids"]) for f in features]
    length = min(len(ids) for ids in [first, *others])
    for ids in others:
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    for f in features:
        answer = next((i for i, label in enumerate(f["labels"]) if label != IGNORE), len(f["labels"]))
        length = min(length, answer - 1)
    return max(0, length)


def read_general_text(file: str, skip: int = 0) -> list[str]:
    """Passages of a general-text file (one per non-blank line) after the first ``skip``."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise DatasetError(f"general text {path} does not exist (general_text in [train])")
    passages = packs.read_passages(path)[skip:]
    if not passages:
        raise DatasetError(f"{path} holds no passages after the first {skip}; the forgetting curve needs some "
                           "(add passages, or lower general_skip)")
    return passages
