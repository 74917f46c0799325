"""Retraining the adapter: LoRA / QLoRA (or full fine-tuning, for comparison) on a dataset snapshot.

``tuneloop train`` (or :func:`trainer.train.main`, or :func:`trainer.train.train_in_subprocess` for
the nightly job) loads a fresh base, trains, and writes ``$TUNELOOP_HOME/adapters/<version>/``:
``adapter_model.safetensors``, ``adapter_config.json``, ``provenance.json`` (base id + sha256,
method, resolved config, dataset version + manifest sha256, seed, library versions, chat template,
system prompt), ``train_config.json``, ``dataset_manifest.json``, ``loss_history.json`` and
``loss_curve.png``. The folder appears whole or not at all; training never promotes it.

Methods
-------
- ``qlora`` (default while the server runs nf4): LoRA on the 4-bit nf4 base, the weights it is
  served with.
- ``lora``: LoRA on the unquantized base (default when the server runs ``quantization = "none"``).
- ``full``: every weight trains; writes ``model.safetensors`` and ``servable: false`` in the
  provenance. The server cannot hot-swap a whole model, so ``full`` is for measurement and
  comparison only (``benchmarks/train.py``).

Every example is the served prompt -- ``assistant.chat.build_messages(system_prompt, [], question)``
through the base's chat template -- plus the answer; the loss covers the answer and its
end-of-turn token only.

Precision
---------
``precision = "auto"`` trains under bf16 autocast where the device multiplies bf16 natively (CUDA,
or a CPU with AVX512-BF16 or AMX), fp32 elsewhere; the nf4 compute dtype follows, and the master
weights and AdamW states stay fp32 (pure-bf16 AdamW loses small updates). On this project's AMD EPYC
(AVX512-BF16), QLoRA on the real model, batch 8 of ~200-token pack examples, HF Trainer path: 350
real tokens/s in bf16 vs 206 in fp32 (1.7x; a bare forward+backward of 8 x 200 tokens: 3.1 vs
7.1 s, 2.3x), with the same losses to two or three decimals over the first steps. Two training
processes on two cores are catastrophic in bf16 (58 s per step measured): train one at a time.
Serving and evaluation stay fp32 on CPU. A 2-core AMD EPYC without AVX-512 (no native bf16, so
fp32) ran the pack's default recipe (benchmarks/pack_result.py, 2026-11-29) at 248 real tokens/s
against 592 with bf16: 71.0 min instead of 28.7, label F1 0.878 (0.871 and 0.834 in bf16), promoted.

Shared prefix
-------------
Every example starts with the same tokens: the chat template's system turn holding the persona
(133 of ~200 tokens per example on the shipped pack). ``share_prefix = true`` (the default) has the
collator split off what all rows of a batch share and the trainer run it once, repeat its key/value
cache across the batch and run the rest of each row on it: the same attention, positions, loss and
gradients (a test compares them with the whole padded batch), with a fraction of the compute. On
the pack's 930 examples (batch 8, QLoRA, bf16): 2.1-2.3 s per step instead of 4.7-5.5 s. It is off
under DDP, where a second forward before the backward would confuse the gradient reducer.

Forgetting
----------
The gate rejects a candidate whose perplexity on general text is above 1.25x the base model's, and
an adapter trained on the domain alone gets there fast: on the shipped pack (benchmarks/pack_result.py,
2026-11-28/29) 1 epoch gave 1.13x, 2 epochs 1.86x, 6 epochs 5.5x. Two things in training work
against it:

- ``replay`` (default 0.1): rows of text the base model wrote itself (trainer/replay.py; sampled
  once per base, cached, 96 tokens each) are mixed into the training data, pulling the model back
  towards the base outside the domain. ``replay_loss = "kl"`` (the default for LoRA/QLoRA) scores
  them by the KL divergence from the base's whole next-token distribution, read from the training
  model with its adapter switched off; ``"tokens"`` uses the sampled tokens as labels (a noisier
  estimate of the same KL, and one a long run learns by heart: over 5 epochs the 232 samples' batch
  loss fell from 3.7 to 1.0, below the base's own ~3, and perplexity reached 4.0x). 2 epochs, gate's
  perplexity ratio: no replay 1.86x (label F1 0.786), tokens 1.215x (0.792), kl 1.063x (0.770);
  4 epochs with kl: 1.156x, label F1 0.824, answer F1 0.516 (25.1 min of training); 5 epochs with
  kl and replay 0.1 (the default): 1.206x, label F1 0.871, answer F1 0.549 (28.7 min), both promoted.
- ``general_text`` / ``max_perplexity_ratio`` (set by the nightly job from ``[gate]``): every
  validation also measures perplexity on the general passages the gate does not use itself (the
  pack's passages after the gate's first 40), written to ``loss_history.json`` as the forgetting
  curve. Only weights within the bar are kept; when no validation is within it, the lowest
  validation loss is kept (and the gate will say why it rejects it). The bar does not stop
  training: perplexity is high while the learning rate is and falls as it decays (1.31x after
  epoch 1 of a 6-epoch run, 1.08x after epoch 1 of a 2-epoch run and 1.06x at its end), so only
  validation loss decides when to stop (``patience``).

Learning rate
-------------
Defaults (``trainer.config.DEFAULT_LR``), measured on SmolLM2-135M-Instruct: QLoRA r=16/alpha=32 on all
projections, 200 banking77 examples (answers "This is about <intent>."), batch 8, warmup 5%, linear
decay; validation loss on 50 held-out examples (the base model: 4.923)::

    lr      steps        val loss   note
    2e-4    25 (1 epoch)  2.111
    1e-3    25 (1 epoch)  1.286
    3e-3    25 (1 epoch)  0.874     the default
    1e-2    25 (1 epoch)  1.816     unstable: train loss spikes back to ~5
    3e-3    75 (3 epochs) 0.331     still falling at every validation, no early stop

``lora`` shares the QLoRA rate; ``full`` uses 5e-5 (a usual full fine-tuning rate, not swept).
On the shipped pack with the default 5-epoch recipe (benchmarks/pack_result.py --lr): 1.5e-3 gave
validation loss 0.116, label F1 0.770 and perplexity 1.04x; 3e-3 gave 0.114, 0.871 (0.834 with
seed 7) and 1.21x. 4.5e-3 over 4 epochs (``--lr 0.0045 --epochs 4``, 23.0 min): 0.106, 0.833 and
1.655x, rejected by the gate's 1.25x bar: above the default the rate buys forgetting, not label F1.

Measured and left off
---------------------
``neftune_alpha`` (NEFTune: uniform noise on the input embeddings of domain batches, scaled by the
whole row length so the shared prefix does not change it, never on replay rows or their base
target). With the default recipe on the pack, alpha 5 reached a lower validation loss (0.104 vs
0.114) but label F1 0.826 and perplexity 1.273x, rejected by the gate; the default recipe scored
0.871 and 0.834 with two seeds. Single runs on 115 test questions differ by about 0.04.

``augment`` (trainer/augment.py: one noisy copy of every training question -- a keyboard slip
and/or texting style -- with 2.5 epochs over the doubled rows, the same 640 steps): validation loss
0.102, label F1 0.819, perplexity 1.218x (promoted, but below the default's 0.871/0.834); the two
typo'd test questions the default missed stayed wrong, and 13 of its 21 misses were the default
run's misses too.

``hints`` (topic hints, assistant/hints.py: a MiniLM + logistic-regression question classifier,
fitted on the training questions and saved in the adapter, names k likely products in each
prompt's system message, in training -- cross-fitted -- evaluation and service). Offline, the two
err on different questions: on the 115 test questions the classifier names the right product first
for 83% and among its first three for 97%, and 9 of the 0.871 run's 17 misses are among its right
ones. Trained with them, 4 epochs (512 steps), k=3: labels listed most likely first, label F1 0.839
(perplexity 1.21x), and the model took the first label for 106 of 115 questions, so it scored like
the classifier: 12 of its 18 misses were a wrong first label followed. Listed alphabetically, so
there is no ranking to copy: 0.838 (1.19x, 27.8 min), the model chose among the three and chose
wrong 13 times. 4 epochs without hints scored 0.824 (replay 0.25), so hints are within a seed's
spread of nothing; they stay off. They also add ~25 prompt tokens (183 vs 158) and a question
embedding per answer: time to first token 164 vs 157 ms on the same hinted prompt
(``benchmarks/serve.py --quick --hints 3``, nf4; decode speed unchanged).

bitsandbytes and fresh processes
--------------------------------
On CPUs with AVX512-BF16, a 4-bit layer that runs in eval mode without gradients repacks its
weights for an inference-only kernel; backward passes through it then drop gradients silently
(PyTorch warns "gemv_4bit: an autograd kernel was not registered"). So training always loads its
own base (``tuneloop train`` is a fresh process; the nightly job uses ``train_in_subprocess``),
keeps the trainable layout through validation passes, refuses a base that already ran inference,
and turns that warning into an error.

Scale-out
---------
Training is HF Trainer, so data parallelism is its DDP: start the same module on several devices
and each process trains on its shard, gradients are averaged, rank 0 writes the adapter::

    torchrun --nproc_per_node 8 -m trainer.train --config-json cfg.json --result-json result.json
    accelerate launch --num_processes 8 -m trainer.train --config-json cfg.json

(``cfg.json`` is a JSON object of ``TrainConfig`` fields; ``batch_size`` is per device.) On CPU the
processes talk over gloo; a slow test runs two CPU processes this way.
"""
