"""Retraining the adapter: LoRA / QLoRA (or full fine-tuning, for comparison) on a dataset snapshot.

`tuneloop train` (or trainer.train.main, or trainer.train.train_in_subprocess for the nightly job)
loads a fresh base, trains, and writes a new adapter folder under $TUNELOOP_HOME/adapters/ with its
provenance (base id and hash, resolved config, dataset manifest, loss history). The folder appears
whole or not at all; training never promotes it. Methods: qlora (LoRA on the 4-bit nf4 base the
server runs), lora (LoRA on the unquantized base), full (every weight; for measurement only, the
server cannot hot-swap a whole model). Every example is the served prompt plus the answer, and the
loss covers the answer only. Training runs under bf16 autocast where the device computes bf16
natively, fp32 elsewhere; master weights and optimizer states stay fp32 (pure-bf16 AdamW loses small
updates). Against forgetting, replay mixes the base model's own text into training, and every
validation measures perplexity on general text so that only weights within the gate's bar are kept.

Modules:

- config.py: TrainConfig (`[train]`) and how its empty fields resolve from the serve config.
- data.py: snapshot reader, chat-template encoding with assistant-only loss, padding and the shared
  system-prompt prefix.
- replay.py: text sampled once from the base model, mixed into training against forgetting.
- augment.py: noisy copies of training questions (off by default).
- model.py: the fresh base prepared for the method and precision, and the bitsandbytes guards.
- loop.py: the optimisation loop (validation, forgetting curve, early stopping, best weights).
- export.py: the adapter folder and its provenance.
- train.py: the job, top to bottom, and its child-process entry point.
- cli.py: `tuneloop train`.

bitsandbytes and fresh processes: on CPUs with AVX512-BF16, a 4-bit layer that runs in eval mode
without gradients repacks its weights for an inference-only kernel, and backward passes through it
then drop gradients silently. So training always loads its own base in a fresh process, keeps the
trainable layout through validation, refuses a base that already ran inference, and turns the
warning that betrays the repack into an error.

Scale-out is HF Trainer's DDP: `torchrun --nproc_per_node N -m trainer.train --config-json cfg.json`
(cfg.json holds TrainConfig fields; batch_size is per device; rank 0 writes the adapter).

Measurements (the recipe, learning rates, precision, replay, what was tried and left off) and the
commands that produced them are in docs/results.md.
"""
