"""Build qa.jsonl for the Peach State Bank pack from the hand-written qa_source.txt.

Every question and answer is written by hand in qa_source.txt. This script only parses it,
roughens about a quarter of the questions the way real customers type (a typo, texting style,
a greeting, a sign-off), and shuffles the rows with a fixed seed, so the output is reproducible:

    python assistant/packs/peach_state_bank/build_qa.py            # rewrites qa.jsonl
    python assistant/packs/peach_state_bank/build_qa.py /tmp/x.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
SOURCE = PACK_DIR / "qa_source.txt"
SEED = 142
ROUGHEN_SHARE = 0.25

GREETINGS = ["Hi, ", "Hello! ", "Hey there, ", "Good morning, ", "Quick question: ", "Excuse me, ", "Sorry to bother you, but "]
SIGN_OFFS = [" Thanks!", " Thank you.", " Appreciate it!", " Please help.", " Thanks in advance."]
# Sign-offs for questions typed without end punctuation, where a capitalised sentence would look odd.
CASUAL_SIGN_OFFS = [" thx", " pls", " ty", " thanks"]


def parse_source(path: Path = SOURCE) -> list[dict]:
    """Rows in source order: each "Q:" line paired with the "A:" above it, under its "== label"."""
    rows, label, answer = [], None, None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("== "):
            label, answer = line[3:].strip(), None
        elif line.startswith("A: "):
            answer = line[3:].strip()
        elif line.startswith("Q: ") and label and answer:
            rows.append({"question": line[3:].strip(), "answer": answer, "label": label})
        else:
            raise ValueError(f"{path.name}:{number}: expected '== label', 'A: ' or 'Q: ' after an answer, got {raw!r}")
    return rows


def _swap_letters(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 5 and word.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    # Swap two interior letters so the word stays recognisable, like a fast typist's slip.
    j = rng.randrange(1, len(word) - 2)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _lower_first(text: str) -> str:
    first = text.split(" ", 1)[0]
    # Keep "I", "I'm" and acronyms such as "CD" or "IRS" as written.
    if first == "I" or first.startswith("I'") or first[:2].isupper():
        return text
    return text[0].lower() + text[1:]


def roughen(question: str, rng: random.Random) -> str:
    """One customer-style change: a letter swap, texting style, a greeting or a sign-off."""
    style = rng.choice(["typo", "texting", "greeting", "sign_off"])
    if style == "typo":
        return _swap_letters(question, rng)
    if style == "texting":
        return question.lower().rstrip("?.!")
    if style == "greeting":
        greeting = rng.choice(GREETINGS)
        # After "Hello!" a new sentence starts; after "Hi," the question continues the sentence.
        return greeting + (_lower_first(question) if greeting.endswith((", ", "but ")) else question)
    if question[-1] in ".?!":
        return question + rng.choice(SIGN_OFFS)
    return question + rng.choice(CASUAL_SIGN_OFFS)


def build(path: Path) -> Counter:
    """Write qa.jsonl to ``path`` and return the number of rows per label."""
    rng = random.Random(SEED)
    rows = parse_source()
    for row in rows:
        if rng.random() < ROUGHEN_SHARE:
            row["question"] = roughen(row["question"], rng)
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Counter(row["label"] for row in rows)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PACK_DIR / "qa.jsonl"
    counts = build(out)
    print(f"wrote {sum(counts.values())} rows to {out}")
    for label, count in sorted(counts.items()):
        print(f"{count:5d}  {label}")
