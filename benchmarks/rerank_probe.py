"""Would reranking an adapter's beam candidates by a question classifier raise label F1?

An offline probe, not a served feature: it measures whether it would pay to build one. On a home
where an adapter was trained (``benchmarks/pack_result.py --home H``), for the adapter's own
snapshot:

1. answers each validation and test question greedily, as served and as the gate scores it;
2. asks beam search for the ``--candidates`` best answers of each question;
3. labels every answer with the gate's answer labeler, and every question with a question
   classifier (MiniLM + logistic regression, fitted on the training questions, as topic hints use);
4. scores rules that pick one candidate: the first (beam) candidate whose label is among the
   question classifier's k likeliest, or the candidate maximising beam score + w * log p(label).

The rule is chosen on the validation questions and only then scored on the test questions, so the
test figure is not a maximum over rules. Because the rule and the gate use the same answer labeler,
every pick is also labelled a second way, by the first catalog product name the answer contains,
so a rule that only pleases the labeler shows up as a gap between the two.

    .venv/bin/python benchmarks/rerank_probe.py --home H [--adapter V] [--candidates 4] [--output F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CATALOG = Path(__file__).resolve().parents[1] / "assistant" / "packs" / "peach_state_bank" / "catalog.json"
OUT_OF_SCOPE = "out_of_scope"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="runtime home holding the adapter (e.g. a pack_result.py --home)")
    parser.add_argument("--adapter", help="adapter version (default: the newest in the home)")
    parser.add_argument("--candidates", type=int, default=4, help="beam candidates per question")
    parser.add_argument("--batch", type=int, default=8, help="questions per generate call")
    parser.add_argument("--output", help="also write the figures as JSON here")
    args = parser.parse_args()
    os.environ["TUNELOOP_HOME"] = args.home

    from assistant import adapters, paths

    paths.configure_environment()
    from assistant.chat import build_messages
    from assistant.classifier import EmbeddingClassifier
    from assistant.config import ServeConfig, load
    from evals import metrics
    from evals.evaluate import EvalSet, ModelRunner, labeler_for
    from feedback import datasets

    version = args.adapter or adapters.list_versions()[-1]
    snapshot = Path(adapters.read_provenance(adapters.adapter_path(version))["dataset"]["path"])
    train, val, test = (datasets.load_split(snapshot, split) for split in ("train", "val", "test"))
    serve = load(ServeConfig, "serve")
    labeler = labeler_for(EvalSet(snapshot.name, test, train))
    questions = EmbeddingClassifier().fit([r["question"] for r in train], [r["label"] for r in train])
    runner = ModelRunner(serve)
    name_of = product_names()
    print(f"adapter {version}, snapshot {snapshot.name}: {len(train)} train / {len(val)} val / {len(test)} test; "
          f"{args.candidates} beam candidates per question")

    figures: dict = {"adapter": version, "candidates": args.candidates}
    chosen = None
    for split, rows in (("val", val), ("test", test)):
        conversations = [build_messages(serve.system_prompt, [], r["question"]) for r in rows]
        started = time.perf_counter()
        greedy = [g.text for g in runner.generate(conversations, version, args.batch)]
        greedy_s = (time.perf_counter() - started) / len(rows)
        started = time.perf_counter()
        beams = beam_candidates(runner, conversations, version, args.candidates, args.batch, serve)
        beam_s = (time.perf_counter() - started) / len(rows)
        flat = labeler.predict([text for candidates in beams for text, _ in candidates])
        labels = [flat[i * args.candidates:(i + 1) * args.candidates] for i in range(len(rows))]
        probs = questions.predict_proba([r["question"] for r in rows])
        classes = questions.classes
        gold = [r["label"] for r in rows]

        def score(texts: list[str], predicted: list[str]) -> dict:
            return {"label_f1": metrics.label_scores(gold, predicted)["f1"],
                    "name_f1": metrics.label_scores(gold, [name_of(t) for t in texts])["f1"],
                    "answer_f1": float(np.mean([metrics.answer_f1(t, r["answer"]) for t, r in zip(texts, rows)]))}

        rules = {"beam 1": lambda i: 0}
        for k in (1, 2, 3):
            top = [set(classes[j] for j in np.argsort(-probs[i])[:k]) for i in range(len(rows))]
            rules[f"first in top {k}"] = (lambda top: lambda i: next(
                (j for j, label in enumerate(labels[i]) if label in top[i]), 0))(top)
        for weight in (0.1, 0.3, 1.0, 3.0):
            rules[f"score + {weight} log p"] = (lambda w: lambda i: int(np.argmax(
                [beams[i][j][1] + w * np.log(probs[i][classes.index(labels[i][j])] + 1e-9) if labels[i][j] in classes
                 else -np.inf for j in range(args.candidates)])))(weight)
        results = {"greedy (served)": score(greedy, labeler.predict(greedy)) | {"changed": 0}}
        for name, rule in rules.items():
            picks = [rule(i) for i in range(len(rows))]
            texts = [beams[i][j][0] for i, j in enumerate(picks)]
            results[name] = score(texts, [labels[i][j] for i, j in enumerate(picks)]) | {
                "changed": sum(j != 0 for j in picks)}
        if split == "val":
            chosen = max(rules, key=lambda name: (results[name]["label_f1"], name == "beam 1"))
        print(f"\n{split}: {len(rows)} questions; s/question greedy {greedy_s:.2f}, beams {beam_s:.2f}; "
              f"question classifier top-1 F1 {metrics.label_scores(gold, list(questions.classes[j] for j in probs.argmax(1)))['f1']:.3f}; "
              f"right label among the candidates {np.mean([g in ls for g, ls in zip(gold, labels)]):.3f} of questions")
        print(f"{'rule':<20}{'label F1':>9}{'by name':>9}{'answer F1':>10}{'changed':>8}")
        for name, r in results.items():
            mark = "  <- chosen on val" if name == chosen else ""
            print(f"{name:<20}{r['label_f1']:>9.3f}{r['name_f1']:>9.3f}{r['answer_f1']:>10.3f}{r['changed']:>8}{mark}")
        figures[split] = {"greedy_s": greedy_s, "beam_s": beam_s, "rules": results}
    figures["chosen_on_val"] = chosen
    print(f"\nchosen on val: {chosen}; test label F1 {figures['test']['rules'][chosen]['label_f1']:.3f} vs greedy "
          f"{figures['test']['rules']['greedy (served)']['label_f1']:.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))
    return 0


def beam_candidates(runner, conversations: list[list[dict]], adapter: str, k: int, batch: int, serve) -> list:
    """The ``k`` beam-search answers of each conversation with their length-normalised log-probabilities,
    best first (the served prompt and settings, as ``ModelRunner.generate``)."""
    import torch

    from assistant.chat import without_special_tokens

    tokenizer, eos, out = runner.tokenizer, runner.tokenizer.eos_token_id, []
    with runner._active(adapter) as model, torch.no_grad():
        for start in range(0, len(conversations), batch):
            chunk = conversations[start:start + batch]
            tokenizer.padding_side = "left"
            inputs = tokenizer.apply_chat_template(
                [without_special_tokens(m, tokenizer) for m in chunk], add_generation_prompt=True,
                return_tensors="pt", return_dict=True, padding=True).to(model.device)
            generated = model.generate(
                **inputs, max_new_tokens=serve.max_new_tokens, do_sample=False, num_beams=k, num_return_sequences=k,
                repetition_penalty=serve.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                output_scores=True, return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
            prompt_len = inputs["input_ids"].shape[1]
            for i in range(len(chunk)):
                candidates = []
                for j in range(i * k, (i + 1) * k):
                    new = generated.sequences[j][prompt_len:].tolist()
                    length = new.index(eos) + 1 if eos in new else len(new)
                    candidates.append((tokenizer.decode(new[:length], skip_special_tokens=True).strip(),
                                       float(generated.sequences_scores[j])))
                out.append(candidates)
    return out


def product_names():
    """A labeller by product name: the label of the first catalog name an answer contains (the
    pack's answers name their product), else out of scope."""
    catalog = json.loads(CATALOG.read_text(encoding="utf-8"))
    names = [(p["name"].lower(), p["label"]) for p in catalog]

    def label_of(text: str) -> str:
        lowered = text.lower()
        found = [(lowered.find(name), -len(name), label) for name, label in names if name in lowered]
        return min(found)[2] if found else OUT_OF_SCOPE

    return label_of


if __name__ == "__main__":
    sys.exit(main())
