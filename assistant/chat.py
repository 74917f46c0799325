"""Chat: the prompt (chat template + system persona + recent turns), streaming generation, and the
adapter hot swap.

Three backends implement :class:`Backend`: :class:`TransformersBackend` (the real model),
``assistant.llama_backend.LlamaCppBackend`` (the same model on llama.cpp, faster on CPU) and
:class:`ScriptedBackend` (canned answers, for fast tests of everything around the model);
:func:`make_backend` builds the one the config names.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from assistant import adapters
from assistant.config import ServeConfig

log = logging.getLogger(__name__)


class ChatError(ValueError):
    """The customer's input cannot be answered as given; the message is shown to them."""


class BusyError(ChatError):
    """Every answer slot and every waiting place is taken; the customer is asked to try again."""


class StartingError(BusyError):
    """The model is still loading (the server answers meanwhile); the customer is asked to try again."""


BUSY_MESSAGE = "The assistant is busy answering other customers. Please try again in a minute."
DRAINING_MESSAGE = "The assistant is restarting. Please try again in a minute."
STARTING_MESSAGE = "The assistant is starting up. Please try again in a moment."


@dataclass
class AnswerStats:
    """What the turn log records about one answer."""

    adapter: str | None
    latency_s: float = 0.0
    first_token_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    sources: list = field(default_factory=list)
    """The references (:class:`Reference`) the prompt held, best first."""
    verbatim: int | None = None
    """The id of the reference whose approved answer was given as it is (:func:`answer_from_reference`)."""
    finish_reason: str | None = None
    """Why generation ended: "stop" (the model ended its answer), "length" (it reached ``max_new_tokens``;
    :class:`Stream` then trims the text to its last sentence end), None while it runs or when stopped early."""


CUT = "length"
"""The finish reason of an answer cut at ``max_new_tokens``."""


@dataclass
class Stream:
    """An answer being generated: iterate for text pieces; ``stats`` is final once exhausted.

    An answer cut at ``max_new_tokens`` ends clean: once exhausted, ``text`` is trimmed back to its
    last sentence end (see :func:`trim_to_sentence`).
    """

    pieces: Iterator[str]
    stats: AnswerStats
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.text += piece
            yield piece
        if self.stats.finish_reason == CUT:
            self.text = trim_to_sentence(self.text)


# A sentence ends at ". ", "!", "?" or a line break (not at the "." of "$2.50" or "7.75%").
_SENTENCE_END = re.compile(r"\.(?=\s)|[!?]|\n")


def trim_to_sentence(text: str) -> str:
    """``text`` up to its last sentence end, if that keeps at least half of it; else ``text`` unchanged
    (a long sentence cut short is better than most of the answer gone)."""
    ends = [match.end() for match in _SENTENCE_END.finditer(text.rstrip())]
    if text.rstrip().endswith((".", "!", "?")):
        return text.rstrip()
    if ends and ends[-1] >= len(text) / 2:
        return text[: ends[-1]].rstrip()
    return text


class Backend(Protocol):
    """Turns chat messages into a streamed answer, on the adapter the pointer names."""

    def stream(self, messages: list[dict], stats: AnswerStats) -> Iterator[str]:
        """Yield answer pieces; fill ``stats`` (adapter, tokens) as generation goes."""
        ...

    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt length in tokens, chat template included."""
        ...

    @property
    def context_window(self) -> int:
        """Most tokens the model attends to."""
        ...


def build_messages(system_prompt: str, history: list[tuple[str, str]], question: str) -> list[dict]:
    """The chat-template input: system persona, earlier (question, answer) turns, the question.

    Training uses the same function, so the model is trained on exactly what it is served.
    """
    messages = [{"role": "system", "content": system_prompt}]
    for asked, answered in history:
        messages.append({"role": "user", "content": asked})
        messages.append({"role": "assistant", "content": answered})
    messages.append({"role": "user", "content": question})
    return messages


class Reference(Protocol):
    """An approved question/answer pair found for a question (``feedback.knowledge.Reference``)."""

    id: int
    question: str
    answer: str
    score: float


class ReferenceSource(Protocol):
    """Finds approved pairs for a question: the knowledge index, injected by the app and the CLI
    (assistant imports nothing of feedback), or a list in tests."""

    def references(self, question: str, k: int, min_score: float) -> list[Reference]:
        """The ``k`` best pairs with similarity >= ``min_score``, best first."""
        ...

    # Optional: ``has_staff() -> bool``, whether any pair is staff-approved (a source without it
    # is searched for staff pairs on every question, see ChatService._prompt).


REFERENCES_INTRO = "Approved answers to similar questions. Use one only if it answers the customer's question:"


def references_text(references: list[Reference]) -> str:
    """The references as the model reads them: question/answer pairs under one line of instruction."""
    pairs = "\n\n".join(f"Question: {r.question.strip()}\nAnswer: {r.answer.strip()}" for r in references)
    return f"{REFERENCES_INTRO}\n\n{pairs}"


def with_references(messages: list[dict], references: list[Reference]) -> list[dict]:
    """``messages`` with the references appended to the system message (a copy; none: unchanged).

    They go in the system turn, which a customer cannot write: the customer's text only ever selects
    them (it is the search query), it never becomes one.
    """
    if not references:
        return messages
    if not messages or messages[0].get("role") != "system":
        raise ValueError("references go in the system message, and these messages have none")
    return [{**messages[0], "content": f"{messages[0]['content']}\n\n{references_text(references)}"}, *messages[1:]]


def without_special_tokens(messages: list[dict], tokenizer) -> list[dict]:
    """The messages with the tokenizer's control-token strings removed from their contents.

    Chat templates paste content verbatim and the tokenizer turns a typed ``<|im_end|>`` into the
    real control token, so a customer could otherwise close their turn and open a forged system
    turn. Serving, evaluation and training all render prompts through this.
    """
    specials = {t for t in tokenizer.all_special_tokens if t}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content}
    cleaned = []
    for message in messages:
        content = message["content"]
        # Repeat: removing one token can join the pieces of another ("<|im_<|im_end|>end|>").
        while any(token in content for token in specials):
            for token in specials:
                content = content.replace(token, "")
        cleaned.append({**message, "content": content})
    return cleaned


def answer_from_reference(references: list[Reference], cfg: ServeConfig) -> Reference | None:
    """The reference whose approved answer is given as it is, without generating; None for none.

    The best reference qualifies when its question is a near-certain match (``verbatim_min_score``)
    and it is an answer (a catalog passage is not); a staff pair leading the references
    (:func:`staff_first`) qualifies from ``staff_verbatim_min_score``, because the models seldom carry
    a correction's figure over even with it first in the prompt (docs/results.md, "Grounded
    answers"). A staff correction then reaches a customer word for word. Serving and evaluation
    both decide with this (evaluation's index holds no staff pairs).
    """
    if not cfg.verbatim or not references:
        return None
    best = references[0]
    source = getattr(best, "source", None)
    if source in STAFF_SOURCES and best.score >= cfg.staff_verbatim_min_score:
        return best
    if best.score >= cfg.verbatim_min_score and source != "catalog":
        return best
    return None


STAFF_SOURCES = ("correction", "approval", "manual", "added")
"""Knowledge entries a person approved after the dataset snapshot (``feedback.knowledge``'s sources
other than ``dataset`` and ``catalog``)."""


def staff_first(references: list[Reference], margin: float) -> list[Reference]:
    """``references`` (best first) with the staff-approved ones scoring within ``margin`` of the best
    moved to the front, each group keeping its order.

    A correction is newer than the training data and a person checked it; when it is about as close
    to the question as a training pair, it is most likely what the question is about now (measured
    in benchmarks/retrieval_threshold.py). Evaluation's index holds no staff entries, so this only
    changes what serving shows.
    """
    if margin <= 0 or not references:
        return references
    bar = references[0].score - margin
    first = [r for r in references if getattr(r, "source", None) in STAFF_SOURCES and r.score >= bar]
    return first + [r for r in references if not any(r is f for f in first)]


def retrieval_for(version: str | None, cfg: ServeConfig) -> tuple[int, float]:
    """``(k, min_score)`` of the references ``version`` (None = the base model) is given: the
    settings the adapter was trained with, (0, 0.0) for one trained without references, the serve
    config's for the base model. Serving and evaluation both decide with this."""
    if version is None:
        return cfg.retrieval_k, cfg.retrieval_min_score
    record = adapters.retrieval_settings(version)
    return (int(record["k"]), float(record["min_score"])) if record else (0, 0.0)


class ChatService:
    """Validates a question, fits the conversation into the context window and streams the answer."""

    def __init__(self, cfg: ServeConfig, backend: Backend | None, references: ReferenceSource | None = None):
        self.cfg = cfg
        self.backend = backend
        """The model; None while it loads (the server is up meanwhile), set once it has loaded."""
        self.references = references
        """Where approved pairs for the prompt come from; None answers without references."""
        # Answers in flight: `concurrency` being generated plus `max_queue` waiting for a slot.
        # Past that a customer is told at once to try again instead of waiting without end.
        self._admitted = threading.BoundedSemaphore(cfg.concurrency + cfg.max_queue)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.draining = False
        """Set on shutdown: answers in flight finish, new questions are refused (:data:`DRAINING_MESSAGE`)."""

    @property
    def loading(self) -> bool:
        """Whether the model is still loading: questions are refused with :data:`STARTING_MESSAGE`."""
        return self.backend is None

    @property
    def in_flight_limit(self) -> int:
        """Answers accepted at once: generating plus waiting (the web app's concurrency limit)."""
        return self.cfg.concurrency + self.cfg.max_queue

    @property
    def in_flight(self) -> int:
        """Answers admitted and not yet finished (generating or waiting for a slot)."""
        return self._in_flight

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every answer in flight to finish; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._in_flight == 0

    def answer(self, question: str, history: list[tuple[str, str]] | None = None) -> Stream:
        if self.draining:
            raise BusyError(DRAINING_MESSAGE)
        if self.backend is None:
            raise StartingError(STARTING_MESSAGE)
        question = (question or "").strip()
        if not question:
            raise ChatError("Please type a question.")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise ChatError("Your message contains characters that are not valid text; please retype it.") from None
        if len(question) > self.cfg.max_input_chars:
            raise ChatError(
                f"Your message is {len(question)} characters long; the limit is {self.cfg.max_input_chars}. "
                "Please shorten it."
            )
        # A place first: a flood of refused questions costs no search and no tokenizing.
        if not self._admitted.acquire(blocking=False):
            raise BusyError(BUSY_MESSAGE)
        self._count_in_flight(+1)
        release = _Once(self._release)
        try:
            messages, references, verbatim = self._prompt(question, history)
        except BaseException:
            release()
            raise
        sources = list(references) or ([verbatim] if verbatim else [])
        stats = AnswerStats(adapter=None, sources=sources, verbatim=verbatim.id if verbatim else None)
        pieces = self._approved(verbatim, stats) if verbatim else self.backend.stream(messages, stats)
        stream = Stream(self._timed(pieces, stats, release), stats)
        # A stream dropped without being read gives its place back too.
        weakref.finalize(stream, release)
        return stream

    def _count_in_flight(self, change: int) -> None:
        with self._in_flight_lock:
            self._in_flight += change

    def _release(self) -> None:
        self._count_in_flight(-1)
        self._admitted.release()

    def _prompt(self, question: str, history: list[tuple[str, str]] | None) -> tuple[list[dict], list[Reference], Reference | None]:
        """The messages to answer from, the references they hold, and the reference to answer with
        as it is instead (:func:`answer_from_reference`), if any.

        An adapter trained without references gets none in its prompt, but a staff pair leading the
        serve settings' search is still given verbatim: a correction reaches customers at once
        whatever the adapter in service was trained with.
        """
        history = list(history or [])[-self.cfg.max_history_turns :] if self.cfg.max_history_turns else []
        budget = self.backend.context_window - self.cfg.max_new_tokens
        k, min_score = self.retrieval()
        references, staff_lead = self._references(question, k, min_score), []
        if k <= 0 and self.cfg.retrieval_k > 0 and self._has_staff():
            found = self._references(question, self.cfg.retrieval_k, self.cfg.retrieval_min_score)
            staff_lead = [r for r in found[:1] if getattr(r, "source", None) in STAFF_SOURCES]
        messages = with_references(build_messages(self.cfg.system_prompt, history, question), references)
        # Drop the oldest turns, then the weakest references, until the prompt fits: training prompts
        # hold references and no earlier turns, so references are what the model learnt to use. The
        # question itself must fit on its own.
        while self.backend.count_tokens(messages) > budget:
            if history:
                history = history[1:]
            elif references:
                references = references[:-1]
            else:
                raise ChatError("Your message is too long for the model's context. Please shorten it.")
            messages = with_references(build_messages(self.cfg.system_prompt, history, question), references)
        return messages, references, answer_from_reference(references or staff_lead, self.cfg)

    def _has_staff(self) -> bool:
        """Whether the index holds any staff pair (a source that cannot tell is taken to hold some)."""
        has_staff = getattr(self.references, "has_staff", None)
        return bool(has_staff()) if has_staff is not None else self.references is not None

    def retrieval(self) -> tuple[int, float]:
        """``(k, min_score)`` for the adapter the pointer names (see :func:`retrieval_for`)."""
        try:
            return retrieval_for(adapters.current_version(), self.cfg)
        except adapters.AdapterError:
            return 0, 0.0  # a refused adapter is not served (the backend keeps the previous one); no guessing

    def _references(self, question: str, k: int, min_score: float) -> list[Reference]:
        if self.references is None or k <= 0:
            return []
        found = list(self.references.references(question, 2 * k if self.cfg.staff_margin > 0 else k, min_score))
        return staff_first(found, self.cfg.staff_margin)[:k]

    @staticmethod
    def _approved(reference: Reference, stats: AnswerStats) -> Iterator[str]:
        """The approved answer as it is; logged with the adapter in service, which did not write it."""
        stats.adapter = adapters.current_version()
        yield reference.answer

    def _timed(self, pieces: Iterator[str], stats: AnswerStats, release: Callable[[], None]) -> Iterator[str]:
        started = time.perf_counter()
        try:
            for piece in pieces:
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - started
                yield piece
            if stats.finish_reason is None and stats.verbatim is None:
                # A backend that does not say why it stopped (vllm) ran to the end of its answer or to
                # the token limit; an answer ending exactly at the limit reads as cut.
                stats.finish_reason = CUT if stats.tokens_out >= self.cfg.max_new_tokens else "stop"
        finally:
            stats.latency_s = time.perf_counter() - started
            release()


class _Once:
    """Calls ``fn`` the first time it is called, never again (a slot is released once)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _SwapGate:
    """Readers are answers in flight; the writer is an adapter swap.

    A swap waits for answers in flight to finish (they end on the adapter they started with) and
    new answers wait for the swap.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._writing = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _PointerWatch:
    """Notices a changed ``current.json`` with one ``stat`` per request."""

    def __init__(self) -> None:
        self._seen: tuple | None = None

    def changed(self) -> bool:
        try:
            stat = adapters.pointer_file().stat()
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            key = None
        if key == self._seen:
            return False
        self._seen = key
        return True


def init_swap_state(backend) -> None:
    """What :func:`follow_pointer` reads and writes, as a backend starts: nothing active yet
    (``active`` None, ``hints`` None: the active adapter's topic hints, ``_hint_tokens`` 0), no
    ``last_error``, and its own gate, pointer watch and swap lock."""
    backend.active = None
    backend.hints = None
    backend._hint_tokens = 0
    backend.last_error = None
    backend._gate = _SwapGate()
    backend._watch = _PointerWatch()
    backend._swap_lock = threading.Lock()


def follow_pointer(backend) -> None:
    """Make ``backend`` serve the adapter the pointer names, if that changed: the hot swap both real
    backends share. A refused adapter leaves the previous one serving and is reported in the
    backend's ``last_error``. The backend brings ``_swap_lock``, ``_watch`` (a
    :class:`_PointerWatch`), ``_gate`` (a :class:`_SwapGate`), ``active``, ``on_model_thread`` and
    ``_activate(version)``, which loads the version (None = the base) on the model thread.
    A backend that serves a version by hand (``use(version)``, for evaluation) replaces ``_watch``
    with a fresh one, so the next call reads the pointer again and goes back to what it names."""
    with backend._swap_lock:
        if not backend._watch.changed():
            return
        wanted = adapters.current_version()
        if wanted == backend.active:
            return
        # Waits, in the caller's thread, for answers in flight: the model thread is then idle.
        with backend._gate.writing():
            try:
                backend.on_model_thread(backend._activate, wanted)
                backend.last_error = None
            except adapters.AdapterError as exc:
                backend.last_error = str(exc)
                log.error("%s; still serving %s", exc, backend.active or "the base model")


class TransformersBackend:
    """The real model: 4-bit (or full-precision) base plus the current LoRA adapter, streamed."""

    name = "transformers"

    def __init__(self, cfg: ServeConfig):
        import torch

        from assistant import model as base_model

        self.cfg = cfg
        # Every torch call on the model (loading, adapter swaps, generation) runs on threads the
        # backend owns. On CPU that is one thread: each thread that runs torch ops keeps its own
        # OpenMP team, and once there are more team threads than cores libgomp stops spinning and
        # sleeps between parallel regions. Loading on one thread and generating on another made a
        # one-token generate 145 ms instead of 110, and a fresh thread per answer put the chat
        # path's first token at 1.7x plain generate's (benchmarks/serve.py). Concurrent chats
        # take turns on it; on two cores parallel generations would only split the same cores.
        gpu = cfg.device != "cpu" and torch.cuda.is_available()
        self._model_thread = ThreadPoolExecutor(max_workers=cfg.concurrency if gpu else 1, thread_name_prefix="model")
        self.base = base_model.prepare(cfg.base_model)
        self.tokenizer, self.model = self.on_model_thread(base_model.load_base, self.base, cfg.quantization, cfg.device)
        self.peft = None
        init_swap_state(self)
        self.sync_adapter()

    def on_model_thread(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` on the model's thread and return its result (or raise its exception)."""
        return self._model_thread.submit(fn, *args, **kwargs).result()

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def count_tokens(self, messages: list[dict]) -> int:
        # The topic hint is added when the answer starts (on the model thread, where the question
        # classifier runs); room for the longest one is counted here.
        return len(self._encode(messages)["input_ids"][0]) + self._hint_tokens

    def _encode(self, messages: list[dict]):
        return self.tokenizer.apply_chat_template(
            without_special_tokens(messages, self.tokenizer), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def sync_adapter(self) -> None:
        """Serve the adapter the pointer names, if it changed (see :func:`follow_pointer`)."""
        follow_pointer(self)

    def _activate(self, version: str | None) -> None:
        if version is None:
            if self.peft is not None:
                self.peft.base_model.disable_adapter_layers()
            self.active, self.hints, self._hint_tokens = None, None, 0
            return
        folder = adapters.adapter_path(version)
        adapters.validate(folder, self.base.model_id, self.base.sha256)
        hints = adapters.load_hints(folder)
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=version, is_trainable=False)
            elif version not in self.peft.peft_config:
                self.peft.load_adapter(str(folder), adapter_name=version, is_trainable=False)
        except Exception as exc:  # shape mismatches and bad configs surface as several error types
            if self.peft is not None and version in self.peft.peft_config:
                self.peft.delete_adapter(version)
            raise adapters.AdapterError(f"adapter {version} refused: it does not fit the base model ({exc})") from exc
        self.peft.base_model.enable_adapter_layers()
        self.peft.set_adapter(version)
        # Keep only the adapter in service in memory; old ones would pile up over many nights.
        for name in list(self.peft.peft_config):
            if name != version:
                self.peft.delete_adapter(name)
        self.peft.eval()
        self.active, self.hints = version, hints
        # "\n\n" + the hint, plus a token of slack for how the join tokenizes.
        self._hint_tokens = len(self.tokenizer("\n\n" + hints.longest_hint())["input_ids"]) + 1 if hints else 0

    def stream(self, messages: list[dict], stats: AnswerStats) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self.sync_adapter()
        with self._gate.reading():
            stats.adapter = self.active
            if self.hints is not None:
                # Embedding the question is torch work: it runs on the model thread too.
                messages = self.on_model_thread(self.hints.apply, [messages])[0]
            inputs = self._encode(messages).to(self.model.device)
            prompt_len = inputs["input_ids"].shape[1]
            stats.tokens_in = prompt_len
            cancelled = threading.Event()
            last_token: list[int] = []

            class _Progress(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    stats.tokens_out = input_ids.shape[1] - prompt_len
                    last_token[:] = [int(input_ids[0, -1])]
                    return cancelled.is_set()

            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
            sampling = self.cfg.temperature > 0
            kwargs = dict(
                **inputs,
                streamer=streamer,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=sampling,
                **penalty_arguments(self.cfg, prompt_len),
                stopping_criteria=StoppingCriteriaList([_Progress()]),
                pad_token_id=self.tokenizer.pad_token_id,
            )
            if sampling:
                kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            model = self.peft if self.active is not None else self.model
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    model.generate(**kwargs)
                except BaseException as exc:  # reported to the caller below, not lost in the thread
                    failure.append(exc)
                    streamer.end()

            job = self._model_thread.submit(run)
            try:
                yield from streamer
            finally:
                # A customer who leaves mid-answer stops generation (or it never starts); the swap
                # gate is released only after the worker is done with the weights.
                cancelled.set()
                if not job.cancel():
                    job.result()
            if failure:
                raise failure[0]
            ended = bool(last_token) and last_token[0] in self._end_ids()
            stats.finish_reason = CUT if stats.tokens_out >= self.cfg.max_new_tokens and not ended else "stop"

    def _end_ids(self) -> set[int]:
        """The token ids that end an answer (generate stops on any of them)."""
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())


def penalty_arguments(cfg: ServeConfig, prompt_len: int) -> dict:
    """``generate`` arguments for the served repetition penalty: transformers' own over prompt and
    answer (``penalize_prompt``), or its processor told to skip the ``prompt_len`` prompt tokens
    (left-padded batches end every prompt at the same position), as the llama.cpp backend counts."""
    if cfg.repetition_penalty == 1.0:
        return {}
    if cfg.penalize_prompt:
        return {"repetition_penalty": cfg.repetition_penalty}
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    return {"logits_processor": LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
        float(cfg.repetition_penalty), prompt_ignore_length=prompt_len)])}


def resolve_backend(cfg: ServeConfig) -> str:
    """The backend that serves ``cfg``: its ``backend``, or for "auto" llama_cpp on a CPU when the
    base is a Llama (several times transformers' decode speed there at the same label F1,
    benchmarks/serving.py and benchmarks/gate_eval.py), else transformers (CUDA, other bases)."""
    if cfg.backend != "auto":
        return cfg.backend
    import json
    from pathlib import Path

    import torch

    from assistant import model as base_model

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return "transformers"
    config = json.loads((Path(base_model.prepare(cfg.base_model).path) / "config.json").read_text(encoding="utf-8"))
    return "llama_cpp" if config.get("architectures") == ["LlamaForCausalLM"] else "transformers"


def make_backend(cfg: ServeConfig) -> Backend:
    """The backend ``cfg`` names (see :func:`resolve_backend`), loaded and serving the pointer's adapter."""
    backend = resolve_backend(cfg)
    if backend == "llama_cpp":
        from assistant.llama_backend import LlamaCppBackend

        return LlamaCppBackend(cfg)
    if backend == "vllm":
        from assistant.vllm_backend import VllmBackend

        return VllmBackend(cfg)
    return TransformersBackend(cfg)


@dataclass
class ScriptedBackend:
    """A fake model for fast tests: answers from a function, word by word, on the pointer's adapter."""

    name = "scripted"
    reply: Callable[[str], str] = lambda question: f"You asked: {question}"
    delay_s: float = 0.0
    context_window: int = 4096
    calls: list[list[dict]] = field(default_factory=list)
    last_error: str | None = None
    """Always None: the scripted backend refuses no adapter (the real ones' refusal message)."""
    max_new_tokens: int | None = None
    """Stop after this many words, as a model stops at ``[serve] max_new_tokens``; None: the whole reply."""

    @property
    def active(self) -> str | None:
        """The adapter the next answer uses: the pointer's (None for the base or a refused pointer)."""
        try:
            return adapters.current_version()
        except adapters.AdapterError:
            return None

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    def stream(self, messages: list[dict], stats: AnswerStats) -> Iterator[str]:
        self.calls.append(messages)
        stats.adapter = adapters.current_version()
        stats.tokens_in = self.count_tokens(messages)
        words = self.reply(messages[-1]["content"]).split(" ")
        cut = self.max_new_tokens is not None and len(words) > self.max_new_tokens
        for index, word in enumerate(words[: self.max_new_tokens]):
            if self.delay_s:
                time.sleep(self.delay_s)
            stats.tokens_out += 1
            yield word if index == 0 else " " + word
        stats.finish_reason = CUT if cut else "stop"
