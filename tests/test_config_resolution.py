"""Training and evaluation read one resolved config (trainer.config.resolve_configs): with a config
file (the pack's persona installed by `tuneloop init`), an environment variable and command-line
flags, `tuneloop retrain`, `tuneloop train` and `tuneloop eval` see the same base model, system
prompt, quantization and generation settings, and the training process keeps them."""

from __future__ import annotations

import dataclasses

import pytest

from assistant import paths
from assistant.config import ServeConfig
from test_evals import write_snapshot
from trainer.config import TrainConfig, resolve, resolve_configs, resolved

CONFIG = """[serve]
base_model = "example/served-model"
quantization = "none"
max_new_tokens = 12
repetition_penalty = 1.3

[train]
epochs = 2.0
min_train_examples = 4
progress = false
"""


class Stop(Exception):
    """Ends a run once the step under test has shown what it was given."""


@pytest.fixture
def configured(monkeypatch):
    from feedback import packs

    paths.config_file().write_text(CONFIG, encoding="utf-8")
    pack = packs.load_pack()
    assert packs.install_persona(pack)  # what `tuneloop init` does: the persona goes into [serve]
    monkeypatch.setenv("TUNELOOP_SERVE_MAX_NEW_TOKENS", "20")  # environment over the file
    return pack


def retrain_sees(monkeypatch) -> tuple[TrainConfig, ServeConfig, str]:
    """What `tuneloop retrain --epochs 3 --lr 0.02` hands to training and to evaluation."""
    from evals import evaluate
    from tuneloop import cli, pipeline

    seen = {}

    def train_candidate(train, timeout_s):
        seen["train"] = train
        return "v-candidate"

    class Runner:
        def __init__(self, serve):
            seen["serve"] = serve

        def generate(self, conversations, adapter, batch_size):
            seen["system_message"] = conversations[0][0]["content"]
            raise Stop

    monkeypatch.setattr(pipeline, "train_candidate", train_candidate)
    monkeypatch.setattr(pipeline, "lower_cpu_priority", lambda increment: 0)
    monkeypatch.setattr(evaluate, "labeler_for", lambda test: None)
    monkeypatch.setattr(evaluate, "make_runner", Runner)  # the runner the serve config picks
    snapshot = write_snapshot()
    assert cli.main(["retrain", "--dataset", str(snapshot), "--epochs", "3", "--lr", "0.02", "--review-samples", "0"]) == 1
    return seen["train"], seen["serve"], seen["system_message"]


def test_train_and_eval_see_the_same_resolved_values(configured, monkeypatch):
    train, serve, system_message = retrain_sees(monkeypatch)
    # Base model, persona and quantization: the values trained on are the values evaluated (and served).
    assert train.base_model == serve.base_model == "example/served-model"
    assert train.system_prompt == serve.system_prompt == system_message == configured.persona
    assert serve.quantization == "none" and train.method == "lora"  # unquantized base: no QLoRA
    # The generation settings the evaluation uses: file and environment, as `tuneloop serve` reads them.
    assert (serve.max_new_tokens, serve.repetition_penalty, serve.temperature) == (20, 1.3, 0.0)
    # Command-line flags over the file; the measured default nowhere needed.
    assert (train.epochs, train.lr, train.replay_loss) == (3.0, 0.02, "kl")
    assert resolved(train)

    # `tuneloop eval` and `tuneloop train` resolve the same serve and train values.
    from evals import evaluate
    from feedback.datasets import DatasetError
    from trainer import train as training
    from tuneloop import cli

    def evaluate_main(cfg, serve):
        seen_by_eval.append(serve)
        raise DatasetError("stop")

    def train_main(cfg):
        seen_by_train.append(cfg)
        raise training.TrainError("stop")

    seen_by_eval, seen_by_train = [], []
    monkeypatch.setattr(evaluate, "main", evaluate_main)
    monkeypatch.setattr(training, "main", train_main)
    assert cli.main(["eval"]) == 2
    assert cli.main(["train", "--epochs", "3", "--lr", "0.02"]) == 2
    assert seen_by_eval == [serve]
    kept = ("dataset", "general_text", "general_skip", "max_perplexity_ratio")  # the nightly job's own settings
    assert dataclasses.replace(seen_by_train[0], **{k: getattr(train, k) for k in kept}) == train


def test_the_training_process_keeps_what_was_resolved(configured):
    train, serve = resolve_configs()
    # The config file changes while the job runs: the training process (trainer.train.main calls
    # resolve again) still trains what the job resolved, on the base and persona it evaluates.
    paths.config_file().write_text('[serve]\nbase_model = "other/model"\nsystem_prompt = "Be brief."\n', encoding="utf-8")
    assert resolve(train) is train
    assert resolve(TrainConfig(**dataclasses.asdict(train))) == train  # as the child process rebuilds it
    assert resolve_configs()[0].base_model == "other/model"  # a new job reads the new file


def test_given_configs_are_resolved_against_each_other_not_the_file(configured):
    train, serve = resolve_configs(TrainConfig(), ServeConfig(quantization="nf4", system_prompt="Be a bank."))
    assert (train.method, train.system_prompt, train.base_model) == ("qlora", "Be a bank.", serve.base_model)
    assert train.lr == 3e-3
