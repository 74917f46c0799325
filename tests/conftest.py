"""Shared fixtures: every test gets its own runtime home; fast tests use a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNELOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def tuneloop_home(tmp_path, monkeypatch) -> Path:
    """Point $TUNELOOP_HOME at a fresh temporary folder for every test."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELOOP_HOME", str(home))
    # The prepared default model is shared across tests (converted once per machine) so slow
    # tests do not each pay the GGUF conversion; everything else stays per test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    for key in [k for k in os.environ if k.startswith("TUNELOOP_") and k not in ("TUNELOOP_HOME", "TUNELOOP_SHARED_DATA")]:
        monkeypatch.delenv(key)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer and chat template (no weights read)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from assistant.model import bundled_gguf

    folder = tmp_path_factory.mktemp("tiny-llama")
    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only public data sets beside the repo; tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set TUNELOOP_SHARED_DATA)")
    return SHARED_DATA
