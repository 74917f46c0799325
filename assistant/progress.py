"""A long command's stages on stderr: a tqdm bar on a terminal, else one line per stage, which stays
readable in a log file (the nightly job's log is read by people). stdout stays the command's own.

Jobs are library functions that tests call directly, so a job's stages show only when its command
line asks (:func:`on_stderr`), and only the outermost job's: curation inside ``tuneloop init`` or
``tuneloop retrain`` is one stage of that command, not a second list of stages. The request travels
in a context variable, so no job's signature (nor the jobs it calls) carries a flag for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_requested: ContextVar[bool] = ContextVar("tuneloop_progress_requested", default=False)
_current: ContextVar[StageProgress | None] = ContextVar("tuneloop_progress_current", default=None)


class StageProgress:
    """Stages ``1..total`` of ``command``: ``start`` each in turn, inside ``with``.

    On a terminal one bar shows the stages done out of ``total``, or for a stage started with a
    ``count`` (questions, examples) the items done out of that count; elsewhere ``start`` prints
    ``COMMAND: STAGE (i/total)``. A run that ends early (nothing to do) simply stops before ``total``.
    """

    def __init__(self, command: str, total: int, shown: bool = True):
        self.command, self.total, self.index = command, total, 0
        self.shown = shown
        self.bar = None
        self._token = None

    def __enter__(self) -> StageProgress:
        if self.shown:
            self._token = _current.set(self)
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.command, unit="stage", leave=False, file=sys.stderr)
        return self

    def start(self, stage: str, count: int | None = None, unit: str = "item") -> None:
        """Stage number ``index + 1`` begins (the ones before it are done); ``count`` items of it
        are then counted with :meth:`advance`."""
        self.index += 1
        if not self.shown:
            return
        if self.bar is None:
            print(f"{self.command}: {stage} ({self.index}/{self.total})", file=sys.stderr, flush=True)
            return
        self.bar.unit = "stage" if count is None else unit
        self.bar.set_description(f"{self.command}: {stage} ({self.index}/{self.total})", refresh=False)
        self.bar.reset(total=self.total if count is None else count)
        if count is None:
            self.bar.n = self.index - 1
            self.bar.refresh()  # redraws now, whatever tqdm's mininterval

    @property
    def counting(self) -> bool:
        """Whether :meth:`advance` shows anything: a bar is drawn (a log gets one line per stage)."""
        return self.bar is not None

    def advance(self, items: int = 1) -> None:
        """``items`` more of the current stage's count are done."""
        if self.bar is not None:
            self.bar.update(items)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._token is not None:
            _current.reset(self._token)


@contextmanager
def on_stderr(enabled: bool = True) -> Iterator[None]:
    """Show the stages of the job run inside (what a command line wraps its job in); ``enabled``
    False keeps it quiet, as library callers are."""
    token = _requested.set(enabled)
    try:
        yield
    finally:
        _requested.reset(token)


def stages(command: str, total: int) -> StageProgress:
    """A job's stages, shown when a command line asked for them (:func:`on_stderr`) and no enclosing
    command shows its own."""
    return StageProgress(command, total, shown=_requested.get() and _current.get() is None)


def current() -> StageProgress | None:
    """The stages shown now, if any: how a step of a job (the nightly pipeline's) reports itself."""
    return _current.get()
