"""The vLLM backend (GPU hosts): what runs without a GPU is its configuration and its LoRA
bookkeeping; the serving path itself runs only where vLLM and CUDA are (marked ``gpu``)."""

from __future__ import annotations

import importlib.util

import pytest

from assistant import adapters
from assistant.chat import ChatService, make_backend
from assistant.config import ConfigError, ServeConfig
from assistant.vllm_backend import LoraRequests, check_penalty, engine_args


def test_vllm_is_a_gpu_backend_chosen_by_config():
    with pytest.raises(ConfigError, match="CUDA"):
        ServeConfig(backend="vllm", device="cpu")
    cfg = ServeConfig(backend="vllm", concurrency=16)
    args = engine_args(cfg, "/models/base", max_lora_rank=64)
    assert args["enable_lora"] and args["max_num_seqs"] == 16 and args["enable_prefix_caching"]
    assert args["quantization"] == "bitsandbytes"  # served on the nf4 base it was trained on
    assert engine_args(ServeConfig(backend="vllm", quantization="none"), "/m", 64)["quantization"] is None


def test_a_penalty_on_the_answer_only_is_refused_with_what_to_set_instead():
    with pytest.raises(ConfigError, match="penalize_prompt = true"):
        check_penalty(ServeConfig(backend="vllm", repetition_penalty=1.1, penalize_prompt=False))
    check_penalty(ServeConfig(backend="vllm", repetition_penalty=1.1, penalize_prompt=True))
    check_penalty(ServeConfig(backend="vllm", repetition_penalty=1.0, penalize_prompt=False))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_error_says_what_to_install(tiny_model_dir):
    with pytest.raises(ConfigError, match="pip install vllm"):
        make_backend(ServeConfig(backend="vllm", base_model=str(tiny_model_dir)))


def test_each_adapter_version_keeps_one_lora_id_and_ids_are_never_reused():
    """vLLM caches adapter weights by integer id: a promotion is a new id, a rollback the old one."""
    loras = LoraRequests()
    first, second = loras.id_for("v1"), loras.id_for("v2")
    assert first != second and loras.id_for("v1") == first and min(first, second) >= 1


@pytest.mark.gpu
def test_vllm_serves_and_hot_swaps_on_a_gpu(tiny_model_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_llama_backend import QUESTIONS, make_lora

    cfg = ServeConfig(backend="vllm", base_model=str(tiny_model_dir), quantization="none", max_new_tokens=12,
                      penalize_prompt=True)
    backend = make_backend(cfg)
    service = ChatService(cfg, backend)
    base_answer = "".join(service.answer(QUESTIONS[0]))
    version = make_lora(tiny_model_dir, seed=5)
    adapters.set_current(version, "test")
    stream = service.answer(QUESTIONS[0])
    adapted = "".join(stream)
    assert stream.stats.adapter == version and adapted != base_answer
    adapters.rollback("test")
    assert "".join(service.answer(QUESTIONS[0])) == base_answer
