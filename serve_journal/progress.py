"""Progress of long operations (compaction, lifecycle, verify, replay): one reporter for all.

Library code announces its work and advances it::

    from serve_journal import progress

    with progress.task("verify files", total=len(files)) as bar:
        for path in files:
            ...
            bar.advance()

Library callers see nothing: reporting is off until :func:`enable` is called, which the
``serve-journal`` command line does. Enabled, a task shows a tqdm bar when the stream (standard
error by default) is a terminal, and otherwise a plain line every ``interval`` seconds plus one at
the end (CI logs, ``kubectl logs``). Nothing is ever written to standard output, so ``--json``
output stays machine-readable. Descriptions name the work (files, partitions, tasks), never a
subject or a feature value.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL_S = 5.0


@dataclass(frozen=True)
class _Settings:
    stream: IO[str] | None
    interval: float
    terminal: bool | None  # None: ask the stream (isatty)


_settings: _Settings | None = None
_settings_lock = threading.Lock()


def enable(stream: IO[str] | None = None, *, interval: float = DEFAULT_INTERVAL_S,
           terminal: bool | None = None) -> None:
    """Report the progress of tasks started from now on, to ``stream`` (default: standard error
    at the time a task starts). ``interval``: seconds between plain lines when not on a terminal.
    ``terminal``: force the bar (``True``) or plain lines (``False``) instead of asking the
    stream's ``isatty()``."""
    if interval < 0:
        raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
    global _settings
    with _settings_lock:
        _settings = _Settings(stream, float(interval), terminal)


def disable() -> None:
    """Stop reporting (the default): tasks started from now on are silent."""
    global _settings
    with _settings_lock:
        _settings = None


def enabled() -> bool:
    """Whether tasks started now report their progress."""
    return _settings is not None


class Progress:
    """A running task's counter; :meth:`advance` is thread-safe and cheap when silent."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._closed = False
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the task are done."""
        with self._lock:
            self.done += n
            self._show()

    def close(self) -> None:
        """The task ended (a second call does nothing)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    def _show(self) -> None:  # silent by default
        pass

    def _close(self) -> None:
        pass


class _Lines(Progress):
    """Plain lines: one every ``interval`` seconds while the task runs, and a last one when it
    ends if any was written (a task shorter than the interval stays silent)."""

    def __init__(self, description: str, total: int | None, stream: IO[str],
                 interval: float) -> None:
        super().__init__(description, total)
        self._stream = stream
        self._interval = interval
        self._started = time.monotonic()
        self._last = self._started
        self._written = False

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"

    def _write(self, state: str) -> None:
        self._written = True
        try:
            self._stream.write(f"{self.description}: {state}\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the work it reports on
            pass

    def _show(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._write(self._count())

    def _close(self) -> None:
        if self._written:
            self._write(f"{self._count()} done in {time.monotonic() - self._started:.1f} s")


class _Bar(Progress):
    """A tqdm bar on a terminal."""

    def __init__(self, description: str, total: int | None, stream: IO[str]) -> None:
        super().__init__(description, total)
        from tqdm import tqdm  # inside: only the CLI on a terminal pays for the import

        self._bar: Any = tqdm(total=total, desc=description, file=stream, leave=True,
                              dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._bar.update(n)

    def _close(self) -> None:
        self._bar.close()


def start(description: str, total: int | None = None) -> Progress:
    """Begin a task that is not a ``with`` block; call :meth:`Progress.close` when it ends.

    Silent unless :func:`enable` was called; then a bar on a terminal or plain lines elsewhere.
    """
    settings = _settings
    if settings is None:
        return Progress(description, total)
    stream = settings.stream if settings.stream is not None else sys.stderr
    terminal = settings.terminal
    if terminal is None:
        try:
            terminal = stream.isatty()
        except (AttributeError, ValueError):
            terminal = False
    if terminal:
        return _Bar(description, total, stream)
    return _Lines(description, total, stream, settings.interval)


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Progress]:
    """A unit of long work: ``total`` steps (``None`` when unknown), advanced by the caller.

    Silent unless :func:`enable` was called; then a bar on a terminal or plain lines elsewhere.
    """
    bar = start(description, total)
    try:
        yield bar
    finally:
        bar.close()

def track(items: Sequence[T] | Iterable[T], description: str,
          total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` as one :func:`task`, advancing once per item (``total``: default the
    length of ``items`` when it has one). The task ends when the loop does."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with task(description, total) as bar:
        for item in items:
            yield item
            bar.advance()
