"""Redaction of customer text: payment card numbers, IBANs, US social security numbers, e-mail
addresses and phone numbers become typed placeholders (``[CARD]``, ``[IBAN]``, ``[SSN]``,
``[EMAIL]``, ``[PHONE]``) before the text is stored, shown to staff or put in the model's prompt.

Every writer of customer or staff text in :mod:`feedback` calls :func:`redact` at the storage
boundary, and the web app redacts a question before the model sees it, so the stored text, the
prompt and the answer shown back all hold the same placeholders. Candidates are found by pattern
and confirmed by a maintained validator (python-stdnum: Luhn for cards, the IBAN check digits;
phonenumbers for phones), so an order number or an amount is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

from assistant import config

KINDS = ("card", "iban", "ssn", "email", "phone")
"""What can be redacted, in the order it is looked for (a card is found before its digits look like a phone)."""

PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}

# 13 to 19 digits, single spaces or dashes allowed between them; not glued to other digits.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
# Upper case as IBANs are printed; a lower-case word after one is left out by the word boundary.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}[- ]?\d{2}[- ]?\d{4}(?![\d])")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


@dataclass
class PrivacyConfig:
    redact: list[str] = field(default_factory=lambda: list(KINDS))
    """Kinds of personal data replaced by a placeholder before customer text is stored or answered: card, iban, ssn, email, phone (an empty list turns redaction off)."""
    phone_region: str = "US"
    """Country whose phone numbers may be written without a +country code (two letters)."""

    def __post_init__(self) -> None:
        if isinstance(self.redact, str):  # from TUNELOOP_PRIVACY_REDACT="card,iban"
            self.redact = [kind.strip() for kind in self.redact.split(",") if kind.strip()]
        unknown = sorted(set(self.redact) - set(KINDS))
        config.check(not unknown, f"[privacy] redact: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        config.check(len(self.phone_region) == 2 and self.phone_region.isalpha(),
                     "[privacy] phone_region must be a two-letter country code such as \"US\"")
        self.phone_region = self.phone_region.upper()


def load_config() -> PrivacyConfig:
    """The ``[privacy]`` settings (defaults < config file < ``TUNELOOP_PRIVACY_*``), read on each
    call so every writer sees the file as it is now."""
    return config.load(PrivacyConfig, "privacy")


def redact(text: str | None, cfg: PrivacyConfig | None = None) -> str | None:
    """``text`` with every enabled kind of personal data replaced by its placeholder (None stays None)."""
    if not text:
        return text
    cfg = cfg or load_config()
    kinds = set(cfg.redact)
    if "card" in kinds:
        text = _CARD.sub(lambda m: _checked(m, _is_card, "card"), text)
    if "iban" in kinds:
        text = _IBAN.sub(_iban, text)
    if "ssn" in kinds:
        text = _SSN.sub(lambda m: _checked(m, ssn.is_valid, "ssn"), text)
    if "email" in kinds:
        text = _EMAIL.sub(PLACEHOLDERS["email"], text)
    if "phone" in kinds:
        text = _phones(text, cfg.phone_region)
    return text


def found(text: str | None, cfg: PrivacyConfig | None = None) -> bool:
    """Whether :func:`redact` would change ``text``."""
    return bool(text) and redact(text, cfg) != text


def _checked(match: re.Match, valid, kind: str) -> str:
    return PLACEHOLDERS[kind] if valid(match.group(0)) else match.group(0)


def _iban(match: re.Match) -> str:
    """The longest valid IBAN at the start of the match (a following word in capitals, or a
    reference number after it, may have been taken in too), then the rest as written."""
    candidate = match.group(0)
    for end in range(len(candidate), 14, -1):
        if iban.is_valid(candidate[:end]) and (end == len(candidate) or candidate[end] == " "):
            return PLACEHOLDERS["iban"] + candidate[end:]
    return candidate


def _is_card(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    # All one digit passes Luhn for some lengths (0000 0000 ...); no issuer hands those out.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn.is_valid(digits)


def _phones(text: str, region: str) -> str:
    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
    for start, end in reversed(spans):
        text = text[:start] + PLACEHOLDERS["phone"] + text[end:]
    return text
