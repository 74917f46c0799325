"""Serving on vLLM, for GPU hosts: the base loaded once with LoRA enabled, each adapter version a
``LoRARequest``.

Promotion does not reload anything: the pointer names a new version, the next answer carries a
new ``LoRARequest`` (its own integer id) and vLLM loads that adapter's weights into its LoRA slots
on first use. Several replicas of ``tuneloop serve`` behind a proxy share one ``$TUNELOOP_HOME``
(or at least its ``adapters/`` folder): each follows the same pointer file.

vLLM needs a CUDA GPU and is not a tuneloop dependency (``pip install vllm``). This module is
written against vLLM's v1 ``AsyncLLM`` API and was not run on a GPU in development: the CPU test
suite checks its configuration and LoRA bookkeeping only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from assistant import adapters
from assistant.chat import AnswerStats, follow_pointer, init_swap_state
from assistant.config import ConfigError, ServeConfig
from assistant.llama_backend import _generation_config, chat_prompt_ids

_DONE = object()


class LoraRequests:
    """One ``LoRARequest`` per adapter version, with an integer id that is never reused in this
    process (vLLM caches adapter weights by that id)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._next = itertools.count(1)

    def id_for(self, version: str) -> int:
        if version not in self._ids:
            self._ids[version] = next(self._next)
        return self._ids[version]

    def request(self, version: str, folder: Path):
        from vllm.lora.request import LoRARequest

        return LoRARequest(version, self.id_for(version), str(folder))


def engine_args(cfg: ServeConfig, base_path: str, max_lora_rank: int) -> dict:
    """``AsyncEngineArgs`` keyword arguments for serving ``cfg`` (the base folder, LoRA on)."""
    return {
        "model": base_path,
        "tokenizer": base_path,
        "enable_lora": True,
        "max_lora_rank": max_lora_rank,
        "max_loras": 2,  # the adapter in service and the one being promoted
        "max_num_seqs": cfg.concurrency,
        # nf4 as trained (QLoRA): vLLM quantizes the base with bitsandbytes when it loads it.
        "quantization": "bitsandbytes" if cfg.quantization == "nf4" else None,
        "enable_prefix_caching": True,  # the system turn all customers share is computed once
    }


def check_penalty(cfg: ServeConfig) -> None:
    """vLLM's repetition penalty always counts the prompt's tokens: refuse a config that asks otherwise."""
    if cfg.repetition_penalty != 1.0 and not cfg.penalize_prompt:
        raise ConfigError(
            "vLLM's repetition penalty counts the prompt's tokens too, so it cannot serve penalize_prompt = false; "
            "set [serve] penalize_prompt = true (evaluation then counts them too) or repetition_penalty = 1.0"
        )


class VllmBackend:
    """The base on vLLM plus the current adapter as a ``LoRARequest``, streamed."""

    name = "vllm"

    def __init__(self, cfg: ServeConfig):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ConfigError(
                "backend 'vllm' needs vLLM and a CUDA GPU (pip install vllm); on a CPU use backend 'llama_cpp'"
            ) from exc
        check_penalty(cfg)
        from transformers import AutoTokenizer

        from assistant import model as base_model

        self.cfg = cfg
        self.base = base_model.prepare(cfg.base_model)
        self.base_config = json.loads((Path(self.base.path) / "config.json").read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        self.eos_ids, generation = _generation_config(self.base.path)
        self._top_k = generation.top_k or 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm", daemon=True).start()
        args = AsyncEngineArgs(**engine_args(cfg, self.base.path, max_lora_rank=64))
        self.engine = self._call(self._make(AsyncLLM, args))
        self._loras = LoraRequests()
        self._lora_request = None
        init_swap_state(self)
        self.sync_adapter()

    @staticmethod
    async def _make(engine_class, args):
        return engine_class.from_engine_args(args)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def context_window(self) -> int:
        return int(self.base_config.get("max_position_embeddings", 2048))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages)) + self._hint_tokens

    def on_model_thread(self, fn, *args, **kwargs):
        """vLLM's engine has its own processes: nothing here needs a thread of its own."""
        return fn(*args, **kwargs)

    def sync_adapter(self) -> None:
        """Serve the adapter the pointer names, if it changed (see :func:`assistant.chat.follow_pointer`)."""
        follow_pointer(self)

    def _activate(self, version: str | None) -> None:
        if version is None:
            self._lora_request, self.active, self.hints, self._hint_tokens = None, None, None, 0
            return
        folder = adapters.adapter_path(version)
        adapters.validate(folder, self.base.model_id, self.base.sha256)
        hints = adapters.load_hints(folder)
        self._lora_request = self._loras.request(version, folder)
        self.active, self.hints = version, hints
        self._hint_tokens = len(self.tokenizer("\n\n" + hints.longest_hint())["input_ids"]) + 1 if hints else 0

    def _sampling(self):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = self.cfg.temperature > 0
        return SamplingParams(
            max_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature if sampling else 0.0,
            top_p=self.cfg.top_p if sampling else 1.0,
            top_k=self._top_k if sampling and self._top_k else -1,
            repetition_penalty=self.cfg.repetition_penalty,
            stop_token_ids=sorted(self.eos_ids),
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _generate(self, prompt: list[int], request_id: str, lora, out: queue.Queue) -> None:
        try:
            async for output in self.engine.generate({"prompt_token_ids": prompt}, self._sampling(), request_id, lora_request=lora):
                completion = output.outputs[0]
                out.put((completion.text, len(completion.token_ids)))
        except BaseException as exc:  # reported to the caller, not lost in the loop
            out.put(exc)
        finally:
            out.put(_DONE)

    def stream(self, messages: list[dict], stats: AnswerStats) -> Iterator[str]:
        self.sync_adapter()
        with self._gate.reading():
            stats.adapter = self.active
            if self.hints is not None:
                messages = self.hints.apply([messages])[0]
            prompt = self.prompt_ids(messages)
            stats.tokens_in = len(prompt)
            out: queue.Queue = queue.Queue()
            request_id = uuid.uuid4().hex
            job = asyncio.run_coroutine_threadsafe(self._generate(prompt, request_id, self._lora_request, out), self._loop)
            try:
                while (item := out.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    text, tokens = item
                    stats.tokens_out += tokens
                    if text:
                        yield text
            finally:
                if not job.done():  # the customer left mid-answer: stop generating it
                    self._call(self.engine.abort(request_id))
                    job.result()
