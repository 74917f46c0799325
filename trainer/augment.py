"""Noisy copies of training questions: typos and texting style, so the adapter reads questions as customers type them.

Customers type fast: "Who cnacels the security deed?", "open acct online how", "jiont account".
A model that has only seen each training question spelt one way maps a misspelt word to whatever
its tokens resemble (on the shipped pack, "cnacels the security deed" came back as a CD answer).
``TrainConfig.augment`` adds, per training example, that many copies of the question roughened by
a generic noise model -- a keyboard slip in one word (two letters swapped, one dropped, one doubled,
or one replaced by a neighbouring key) and/or texting style (lower case, no end punctuation) --
with the same answer. Only training rows are copied; validation and test questions are never
touched, so the figures stay comparable with runs without it.

The copies are a function of (seed, row position, copy number), so the same snapshot and seed give
the same training set.
"""

from __future__ import annotations

import math
import random

# Neighbouring keys on a US QWERTY keyboard (letters only): the usual substitution slip. Rows are
# staggered, so the keys above a letter sit at its column and the next, those below at its column and the one before.
_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _neighbours(r: int, c: int) -> str:
    spots = [(r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c)]
    return "".join(_ROWS[i][j] for i, j in spots if 0 <= i < len(_ROWS) and 0 <= j < len(_ROWS[i]))


NEIGHBOURS = {ch: _neighbours(r, c) for r, row in enumerate(_ROWS) for c, ch in enumerate(row)}
# Share of copies that get a typo (the rest are texting style only); a quarter of the typo'd also get texting style.
TYPO_SHARE = 0.75
BOTH_SHARE = 0.25


def keyboard_slip(word: str, rng: random.Random) -> str:
    """``word`` with one slip inside it (first and last letters kept, so it stays recognisable)."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(["swap", "drop", "double", "neighbour"])
    if kind == "swap" and i < len(word) - 2:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop":
        return word[:i] + word[i + 1 :]
    if kind == "double":
        return word[: i + 1] + word[i] + word[i + 1 :]
    near = NEIGHBOURS.get(word[i].lower(), "")
    if not near:
        return word[:i] + word[i] + word[i:]  # not a letter we know the neighbours of: double it instead
    sub = rng.choice(near)
    return word[:i] + (sub.upper() if word[i].isupper() else sub) + word[i + 1 :]


def noisy_question(question: str, rng: random.Random) -> str:
    """A roughened copy of ``question``: a keyboard slip, texting style, or both; never the same text."""
    words = question.split(" ")
    # Words of 4+ letters: a slip in "a" or "is" makes another word, not a typo.
    slippable = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    typo = bool(slippable) and rng.random() < TYPO_SHARE
    texting = not typo or rng.random() < BOTH_SHARE
    if typo:
        i = rng.choice(slippable)
        words[i] = keyboard_slip(words[i], rng)
    text = " ".join(words)
    if texting:
        text = text.lower().rstrip("?.! ")
    if text == question or not text:
        # Already lower case without punctuation and no word to slip: add the casual ending customers type.
        text = question.rstrip() + " pls"
    return text


def augment_rows(rows: list[dict], copies: float, seed: int) -> list[dict]:
    """Noisy copies of ``rows`` (each row dict with a new "question"): ``copies`` per row on average.

    ``copies = 1.5`` gives every row one copy and half of them (chosen by the seed) a second.
    """
    if copies <= 0:
        return []
    out = []
    for k in range(math.ceil(copies)):
        share = min(1.0, copies - k)
        for i, row in enumerate(rows):
            rng = random.Random(f"{seed}:{i}:{k}")
            if share < 1.0 and rng.random() >= share:
                continue
            out.append(dict(row, question=noisy_question(str(row["question"]).strip(), rng)))
    return out
