"""Server logging: plain text for people, or ``--log-format json`` for a log shipper: one JSON object
per line with the time, level, logger, event and the known fields of a turn (id, adapter, status,
latency). Only those fields are copied from a record, and an exception is logged as its type and
stack without its message, so customer text cannot reach the log through either.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import datetime, timezone

FIELDS = ("turn_id", "adapter", "status", "latency_s", "first_token_s", "tokens_in", "tokens_out", "error_id")
"""The ``extra={...}`` keys a JSON log line carries; anything else a record holds is left out."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``event`` and :data:`FIELDS`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in FIELDS if hasattr(record, key)})
        if record.exc_info and record.exc_info[0] is not None:
            # The type and where, not the message: an exception's text may quote what a customer typed.
            line["exception"] = record.exc_info[0].__name__
            line["stack"] = [f"{frame.filename}:{frame.lineno} in {frame.name}"
                             for frame in traceback.extract_tb(record.exc_info[2])]
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str, verbose: bool = False) -> None:
    """Send log records to stderr in ``log_format`` ("text" or "json"); JSON also logs each turn
    (INFO), which is what a shipper wants, text only warnings unless ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose or log_format == "json" else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per HTTP request of the server's own clients
