"""Foundation: config precedence, base model preparation, adapter store and hot swap, chat limits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from assistant import adapters, paths
from assistant.chat import ChatError, ChatService, ScriptedBackend, TransformersBackend
from assistant.config import ConfigError, ServeConfig, load


def make_adapter(base_dir: Path, seed: int, base_sha: str | None = None, version: str | None = None,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 4, alpha: int = 64, std: float = 1.0) -> str:
    """Save a random (non-zero) LoRA adapter for the tiny model as the trainer would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assistant.model import prepare

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, std)
    version = version or adapters.new_version() + f"-{seed}"
    folder = adapters.adapter_path(version)
    peft_model.save_pretrained(folder, safe_serialization=True)
    info = prepare(str(base_dir))
    paths.write_json_atomic(
        folder / adapters.PROVENANCE_FILE,
        {"base_model": info.model_id, "base_model_sha256": base_sha or info.sha256, "method": "lora",
         "weights_sha256": paths.sha256_file(folder / adapters.WEIGHTS_FILE)},
    )
    return version


@pytest.fixture
def tiny_cfg(tiny_model_dir) -> ServeConfig:
    return ServeConfig(base_model=str(tiny_model_dir), quantization="nf4", device="cpu", max_new_tokens=8)


@pytest.fixture
def tiny_backend(tiny_cfg) -> TransformersBackend:
    return TransformersBackend(tiny_cfg)


def answer(service: ChatService, question: str = "hello"):
    stream = service.answer(question)
    text = "".join(stream)
    return text, stream.stats


def test_home_is_the_env_folder(tuneloop_home):
    assert paths.home() == tuneloop_home.resolve()
    assert paths.adapters_dir().parent == tuneloop_home.resolve()


def test_config_precedence_defaults_file_env_overrides(tuneloop_home, monkeypatch):
    assert load(ServeConfig, "serve").port == 7860
    paths.config_file().write_text('[serve]\nport = 8000\nmax_new_tokens = 50\n')
    assert load(ServeConfig, "serve").port == 8000
    monkeypatch.setenv("TUNELOOP_SERVE_PORT", "8100")
    cfg = load(ServeConfig, "serve")
    assert (cfg.port, cfg.max_new_tokens) == (8100, 50)
    assert load(ServeConfig, "serve", {"port": "8200", "host": None}).port == 8200


def test_config_errors_say_what_to_change(tuneloop_home):
    with pytest.raises(ConfigError, match="quantization must be"):
        load(ServeConfig, "serve", {"quantization": "int3"})
    with pytest.raises(ConfigError, match="not a valid int"):
        load(ServeConfig, "serve", {"port": "eighty"})
    paths.config_file().write_text("[serve]\nprot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load(ServeConfig, "serve")
    paths.config_file().write_text("[serve\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(ServeConfig, "serve")


def test_environment_is_offline_and_inside_home(tuneloop_home, monkeypatch):
    for key in ("HF_HOME", "HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED", "MPLCONFIGDIR"):
        monkeypatch.delenv(key, raising=False)
    paths.configure_environment()
    import os

    assert os.environ["HF_HOME"].startswith(str(tuneloop_home.resolve()))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_adapter_version_names_cannot_escape_the_store():
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 80):
        with pytest.raises(adapters.AdapterError):
            adapters.adapter_path(bad)


def test_pointer_flips_atomically_and_rolls_back(tiny_model_dir):
    first, second = make_adapter(tiny_model_dir, 1), make_adapter(tiny_model_dir, 2)
    assert adapters.current_version() is None
    adapters.set_current(first, "test")
    adapters.set_current(second, "test")
    assert adapters.current_version() == second
    assert adapters.rollback()["version"] == first
    assert adapters.rollback()["version"] is None
    with pytest.raises(adapters.AdapterError, match="nothing to roll back"):
        adapters.rollback()
    with pytest.raises(adapters.AdapterError, match="does not exist"):
        adapters.set_current("v-missing", "test")
    assert not list(paths.adapters_dir().glob(".current.json.*"))


def test_base_model_answers_then_hot_swaps_without_restart(tiny_backend, tiny_model_dir, tiny_cfg):
    service = ChatService(tiny_cfg, tiny_backend)
    base_text, stats = answer(service)
    assert stats.adapter is None and stats.tokens_in > 0 and stats.tokens_out > 0
    version = make_adapter(tiny_model_dir, 3)
    adapters.set_current(version, "test")
    text, stats = answer(service)
    assert stats.adapter == version
    assert text != base_text, "a random adapter must change greedy output"
    adapters.set_current(None, "test")
    text, stats = answer(service)
    assert stats.adapter is None and text == base_text


def test_answer_in_flight_finishes_on_its_adapter(tiny_backend, tiny_model_dir, tiny_cfg):
    first, second = make_adapter(tiny_model_dir, 4), make_adapter(tiny_model_dir, 5)
    adapters.set_current(first, "test")
    service = ChatService(tiny_cfg, tiny_backend)
    in_flight = service.answer("first question")
    pieces = iter(in_flight)
    next(pieces)  # generation has started on `first`
    adapters.set_current(second, "test")
    later: dict = {}
    thread = threading.Thread(target=lambda: later.update(stats=answer(service, "second")[1]))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "the swap must wait for the answer in flight"
    for _ in pieces:
        pass
    thread.join(timeout=60)
    assert in_flight.stats.adapter == first
    assert later["stats"].adapter == second


def test_the_model_runs_on_one_thread_of_its_own(tiny_backend, tiny_cfg, tiny_model_dir):
    # Every thread that runs torch ops keeps an OpenMP team, and more team threads than cores slow
    # every forward pass: on CPU the model is loaded, swapped and run on one thread of its own.
    seen = []
    generate = tiny_backend.model.generate

    def recording(*args, **kwargs):
        seen.append(threading.current_thread())
        return generate(*args, **kwargs)

    tiny_backend.model.generate = recording
    service = ChatService(tiny_cfg, tiny_backend)
    for question in ("first", "second", "third"):
        text, stats = answer(service, question)
        assert stats.tokens_out > 0
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0] is not threading.current_thread()
    assert seen[0].name.startswith("model") and seen[0].is_alive()
    assert tiny_backend.on_model_thread(threading.current_thread) is seen[0]

    # A customer who leaves mid-answer: the answer's generator is closed, which waits for its
    # generation to stop and releases the weights; the same thread answers the next question.
    # Chats at once take turns on it, and an adapter swap waits for them, on the same thread.
    stream = service.answer("leaving early")
    next(iter(stream))
    stream.pieces.close()
    assert tiny_backend._gate._readers == 0
    assert answer(service, "after")[1].tokens_out > 0 and seen[-1] is seen[0]
    results = []
    workers = [threading.Thread(target=lambda q=q: results.append(answer(service, q)[0])) for q in "abcdef"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(results) == 6 and set(seen) == {seen[0]}
    swapped_on = []
    activate = tiny_backend._activate
    tiny_backend._activate = lambda version: swapped_on.append(threading.current_thread()) or activate(version)
    adapters.set_current(make_adapter(tiny_model_dir, 9), "test")
    assert answer(service, "on the new adapter")[1].adapter == tiny_backend.active is not None
    assert swapped_on == [seen[0]] and len(seen) == 12 and set(seen) == {seen[0]}


@pytest.mark.parametrize("damage", ["pickle", "truncated", "other_base", "no_weights", "bad_config"])
def test_bad_adapters_are_refused_and_previous_keeps_serving(damage, tiny_backend, tiny_model_dir, tiny_cfg):
    good = make_adapter(tiny_model_dir, 6)
    adapters.set_current(good, "test")
    service = ChatService(tiny_cfg, tiny_backend)
    assert answer(service)[1].adapter == good
    bad = make_adapter(tiny_model_dir, 7, base_sha="0" * 64 if damage == "other_base" else None)
    folder = adapters.adapter_path(bad)
    weights = folder / adapters.WEIGHTS_FILE
    if damage == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bad_config":
        (folder / adapters.CONFIG_FILE).write_text("{not json")
    adapters.set_current(bad, "test")
    if damage == "no_weights":
        weights.unlink()
    stats = answer(service)[1]
    assert stats.adapter == good
    expected = {"pickle": "pickle", "truncated": "corrupt", "other_base": "built for base model",
                "no_weights": "missing", "bad_config": "not JSON"}[damage]
    assert expected in tiny_backend.last_error


def test_adapter_with_wrong_shapes_is_refused(tiny_backend, tiny_model_dir, tiny_cfg, tmp_path):
    """An adapter that claims our base but whose tensors do not fit it is refused at load."""
    import torch
    from safetensors.torch import load_file, save_file

    version = make_adapter(tiny_model_dir, 8)
    weights = adapters.adapter_path(version) / adapters.WEIGHTS_FILE
    tensors = {k: torch.zeros(v.shape[0] + 3, v.shape[1]) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    provenance = adapters.read_provenance(weights.parent) | {"weights_sha256": paths.sha256_file(weights)}
    paths.write_json_atomic(weights.parent / adapters.PROVENANCE_FILE, provenance)
    adapters.set_current(version, "test")
    stats = answer(ChatService(tiny_cfg, tiny_backend))[1]
    assert stats.adapter is None
    assert "does not fit" in tiny_backend.last_error


def test_chat_refuses_empty_and_oversized_messages():
    service = ChatService(ServeConfig(max_input_chars=20), ScriptedBackend())
    with pytest.raises(ChatError, match="type a question"):
        service.answer("   ")
    with pytest.raises(ChatError, match="limit is 20"):
        service.answer("x" * 21)


def test_answers_past_the_slots_and_the_queue_are_told_at_once_to_try_again():
    """``concurrency`` answers run and ``max_queue`` wait; the next customer gets the busy message
    at once instead of an unbounded wait, and every finished, abandoned or never-read answer gives
    its place back."""
    from assistant.chat import BUSY_MESSAGE, BusyError

    service = ChatService(ServeConfig(concurrency=1, max_queue=1), ScriptedBackend(delay_s=0.01))
    first, second = service.answer("one"), service.answer("two")
    with pytest.raises(BusyError, match="try again"):
        service.answer("three")
    assert isinstance(BusyError(BUSY_MESSAGE), ChatError)  # shown to the customer like other refusals
    assert "".join(first) == "You asked: one"
    third = iter(service.answer("three"))
    next(third)
    third.close()  # the customer left mid-answer
    del second  # never read: dropped streams give their place back too
    four, five = service.answer("four"), service.answer("five")  # both places are free again
    assert ("".join(four), "".join(five)) == ("You asked: four", "You asked: five")
    with pytest.raises(ConfigError, match="max_queue"):
        ServeConfig(max_queue=-1)
    tight = ChatService(ServeConfig(concurrency=1, max_queue=0), ScriptedBackend(context_window=200))
    for _ in range(3):  # a refused prompt gives its place back at once
        with pytest.raises(ChatError, match="too long"):
            tight.answer("word " * 150)
    assert "".join(tight.answer("six")) == "You asked: six"


def test_history_is_trimmed_to_fit_the_context():
    backend = ScriptedBackend(context_window=140)
    service = ChatService(ServeConfig(max_new_tokens=64, max_history_turns=10), backend)
    history = [("question " * 10, "answer " * 10)] * 5
    "".join(service.answer("latest?", history))
    sent = backend.calls[-1]
    assert sent[0]["role"] == "system" and sent[-1]["content"] == "latest?"
    assert backend.count_tokens(sent) <= 140 - 64
    with pytest.raises(ChatError, match="too long for the model"):
        service.answer("word " * 200)


def test_prompt_uses_chat_template_and_system_prompt(tiny_backend):
    from assistant.chat import build_messages

    messages = build_messages("You are Peach.", [("hi", "hello")], "rates?")
    text = tiny_backend.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system\nYou are Peach.<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_prepare_local_folder_records_a_stable_hash(tiny_model_dir):
    from assistant.model import prepare

    first, second = prepare(str(tiny_model_dir)), prepare(str(tiny_model_dir))
    assert first.sha256 == second.sha256 and len(first.sha256) == 64


def test_unknown_hub_id_offline_gives_clear_error():
    from assistant.model import ModelError, prepare

    with pytest.raises(ModelError, match="cannot find base model"):
        prepare("no-such-org/no-such-model")


@pytest.mark.slow
def test_default_model_prepares_once_and_answers_in_nf4(tuneloop_home):
    from assistant.model import PROVENANCE_FILE, prepare

    info = prepare()
    record = json.loads((Path(info.path) / PROVENANCE_FILE).read_text())
    assert record["source_sha256"] == info.sha256
    mtime = (Path(info.path) / "model.safetensors").stat().st_mtime_ns
    assert prepare().sha256 == info.sha256
    assert (Path(info.path) / "model.safetensors").stat().st_mtime_ns == mtime, "prepare must be idempotent"
    backend = TransformersBackend(ServeConfig(max_new_tokens=24, device="cpu"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in backend.model.modules())
    text, stats = answer(ChatService(backend.cfg, backend), "What is a lien?")
    assert len(text.split()) >= 3 and stats.tokens_out > 3
    # After inference the 4-bit weights must still be in the standard layout: an adapter attached
    # to repacked weights (a hot swap) produced garbage on AVX512-BF16 CPUs.
    layers = [m for m in backend.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)



@pytest.mark.slow
def test_hot_swapped_adapter_answers_as_a_freshly_loaded_one(tuneloop_home):
    """On the real model: an adapter attached after the base already answered gives the same answer
    as one loaded at start. (bitsandbytes' CPU repack of 4-bit weights made a hot-swapped adapter
    produce garbage; assistant.model.keep_4bit_layout prevents it.)"""
    import torch
    from peft import LoraConfig, get_peft_model

    from assistant.model import load_base, prepare

    info = prepare()
    _, plain = load_base(info, "none", "cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(plain, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 2e-3)
    version = adapters.new_version()
    folder = adapters.adapter_path(version)
    peft_model.save_pretrained(folder, safe_serialization=True)
    paths.write_json_atomic(folder / adapters.PROVENANCE_FILE, {"base_model": info.model_id, "base_model_sha256": info.sha256})

    cfg = ServeConfig(device="cpu", max_new_tokens=16)
    swapped = TransformersBackend(cfg)
    answer(ChatService(cfg, swapped), "What is a lien?")
    adapters.set_current(version, "test")
    text_swapped, stats = answer(ChatService(cfg, swapped), "How do I open a savings account?")
    assert stats.adapter == version
    text_fresh, _ = answer(ChatService(cfg, TransformersBackend(cfg)), "How do I open a savings account?")
    assert text_swapped == text_fresh


def test_4bit_layers_keep_the_standard_layout_and_other_modules_are_untouched(tiny_model_dir):
    import bitsandbytes as bnb
    import torch

    from assistant.model import keep_4bit_layout, load_base, prepare

    _, model = load_base(prepare(str(tiny_model_dir)), "nf4", "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)

    # Not a bitsandbytes 4-bit layer, however it looks: never touched, never an error.
    lookalike = torch.nn.Linear(4, 4)
    lookalike.support_avx512bf16_for_cpu = True
    keep_4bit_layout(torch.nn.Sequential(lookalike, torch.nn.Linear(4, 4)))
    assert lookalike.support_avx512bf16_for_cpu is True


def test_a_bitsandbytes_without_the_layout_switch_is_refused_by_name():
    """A newer bitsandbytes that renamed or dropped the private switch must fail loudly: silently
    skipping it would let the CPU repack break hot-swapped adapters again."""
    import bitsandbytes as bnb
    import torch

    from assistant.model import ModelError, keep_4bit_layout

    layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4")
    keep_4bit_layout(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False
    del layer.support_avx512bf16_for_cpu  # what a bitsandbytes without the switch builds
    with pytest.raises(ModelError, match=rf"bitsandbytes {bnb.__version__}.*support_avx512bf16_for_cpu"):
        keep_4bit_layout(torch.nn.Sequential(torch.nn.Linear(4, 4), layer))
