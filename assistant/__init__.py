"""Serving side of tuneloop: base model + LoRA adapter, chat template, streaming, adapter store."""
