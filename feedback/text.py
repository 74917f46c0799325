"""Text checks shared by everything that stores what people type."""

from __future__ import annotations


def is_storable(text: str) -> bool:
    """False for text that is not valid Unicode: unpaired surrogates (which a JSON ``\\udc80``
    escape can carry) cannot be encoded as UTF-8, so SQLite and the hash functions reject them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_STORABLE = "contains characters that are not valid text; please retype it"
