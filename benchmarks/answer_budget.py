"""How often answers reach ``[serve] max_new_tokens`` (and are cut) at budgets around the one
``tuneloop init`` writes: the 99th percentile of the pack's answers in tokens, times
``feedback.packs.ANSWER_TOKENS_MARGIN`` (1.5).

For each multiplier of that 99th percentile, the pack's test questions are answered as served
(references as ``evals.evaluate`` gives them) by the base model and by each ``--adapter`` of
``--home``, greedy, and the share of answers that used the whole budget is printed.

    .venv/bin/python benchmarks/answer_budget.py --home $TUNELOOP_HOME [--adapter V ...] [--margins 1.0 1.5 2.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="a TUNELOOP_HOME set up with the pack (tuneloop init)")
    parser.add_argument("--adapter", action="append", default=[], help="an adapter of --home (repeatable)")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = parser.parse_args()
    os.environ["TUNELOOP_HOME"] = args.home
    from assistant import paths

    paths.configure_environment()
    from assistant import model as base_models
    from assistant.chat import answer_from_reference, build_messages, with_references
    from assistant.config import ServeConfig, load
    from evals import evaluate as evaluation
    from feedback import datasets, packs

    serve = load(ServeConfig, "serve")
    info = base_models.prepare(serve.base_model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    p99 = packs.answer_token_budget(packs.load_pack("peach_state_bank"), count) / packs.ANSWER_TOKENS_MARGIN
    test = evaluation.load_test_set(evaluation.EvalConfig(dataset=str(datasets.latest_snapshot())))
    index = test.index()
    print(f"pack answers' 99th percentile: about {p99:.0f} tokens; {len(test.examples)} test questions")
    print(f"{'system':<40} " + " ".join(f"{f'x{m:g} ({8 * math.ceil(p99 * m / 8)})':>12}" for m in args.margins))
    for adapter in [None, *args.adapter]:
        cells = []
        for margin in args.margins:
            budget = 8 * math.ceil(p99 * margin / 8)
            cfg = dataclasses.replace(serve, max_new_tokens=budget)
            runner = evaluation.make_runner(cfg)
            retrieval = evaluation.retrieval_settings(adapter, cfg)
            found = index.references(retrieval["k"], retrieval["min_score"]) if retrieval else [[] for _ in test.examples]
            asked = [with_references(build_messages(cfg.system_prompt, [], row["question"]), refs)
                     for row, refs in zip(test.examples, found) if answer_from_reference(refs, cfg) is None]
            generations = runner.generate(asked, adapter, 16)
            cut = sum(g.tokens_out >= budget for g in generations)
            cells.append(f"{cut / len(generations):>11.1%} ")
            del runner
        print(f"{adapter or 'base model':<40} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
