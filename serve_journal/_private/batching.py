"""A generic batching worker: a bounded buffer, one background thread, timers and lifecycle.

It knows nothing about journal entries. ``offer`` is the only call on the request path: a length
check and a deque append, O(1), never raising. The worker thread hands batches to an ``export``
callable (finalize + send); periodic tasks (metrics, heartbeats, registry refresh) run on the
same thread so a replica owns exactly one journal thread. Unlike OpenTelemetry's
BatchSpanProcessor, nothing is dropped silently: every refused item is reported to ``on_drop``
with a reason.

Backpressure: an optional ``ready()`` gate (a transport's ``has_room``) is asked before each
batch; while it says no, the items stay in the buffer and the thread keeps running its periodic
tasks. The buffer then fills and ``offer`` returns ``False``, which is where the caller's overflow
policy applies (drop counted, wait, or refuse): a stalled sink reaches the request path instead of
making the background drop what was already accepted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("serve_journal")

REASON_BUFFER_FULL = "buffer_full"
REASON_EXPORT_FAILED = "export_failed"
REASON_CLOSED = "closed"


GIL_SLICE_S = 0.0005
"""How long the flusher computes before it gives the GIL back (:class:`GilPacer`)."""


class GilPacer:
    """Called between small steps of background work; every ``slice_s`` seconds it gives the
    GIL back (``time.sleep(0)``), so a thread waiting for it (the replica's event loop) runs now
    instead of after the interpreter's switch interval (5 ms) or a whole batch.

    Not thread-safe: one per worker thread.
    """

    __slots__ = ("_since", "slice_s", "yields")

    def __init__(self, slice_s: float = GIL_SLICE_S) -> None:
        self.slice_s = slice_s
        self.yields = 0
        """How many times it gave the GIL back (for tests and metrics)."""
        self._since = time.perf_counter()

    def __call__(self) -> None:
        """Give the GIL back if the current slice is used up."""
        if time.perf_counter() - self._since >= self.slice_s:
            time.sleep(0)  # releases the GIL; a waiting thread takes it
            self.yields += 1
            self._since = time.perf_counter()

    def restart(self) -> None:
        """Start a new slice (after the thread slept or waited)."""
        self._since = time.perf_counter()


class WorkerDiedError(RuntimeError):
    """The background worker stopped unexpectedly; what it held is reported as dropped."""


class PeriodicTask:
    """A callable the worker runs every ``interval_s`` seconds (errors are logged, not fatal)."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], Any]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self.next_at = time.monotonic() + interval_s


class BatchWorker:
    """Owns the buffer and the thread that drains it into ``export``."""

    def __init__(
        self,
        export: Callable[[list[Any]], None],
        *,
        capacity: int,
        batch_size: int,
        interval_s: float,
        on_drop: Callable[[Sequence[Any], str], None],
        reserve: int = 0,
        periodic: Sequence[PeriodicTask] = (),
        ready: Callable[[], bool] | None = None,
        name: str = "serve-journal-flusher",
        start: bool = True,
    ) -> None:
        """``start=False`` leaves the thread to :meth:`start`, once whatever ``export``,
        ``on_drop`` and the periodic tasks reach exists. ``ready()`` (optional) gates each export:
        while it returns false, items wait in the buffer (see the module docstring)."""
        self._export = export
        self._ready = ready
        self._capacity = capacity
        self._reserve = reserve
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._on_drop = on_drop
        self._periodic = list(periodic)
        self._items: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._exported_generation = 0
        self._requested_generation = 0
        self._closing = False
        self._closed = False
        self._died: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker thread (when built with ``start=False``)."""
        self._thread.start()

    # -- request path -------------------------------------------------------------------------

    def offer(self, item: Any, *, report_drop: bool = True, reserved: bool = False) -> bool:
        """Buffer ``item``; ``False`` when full or closed (then ``on_drop`` unless
        ``report_drop`` is false: the caller applies its own overflow policy). ``reserved`` items
        may also use the reserve room. Never raises."""
        items = self._items
        limit = self._capacity + self._reserve if reserved else self._capacity
        if len(items) >= limit or self._closing:
            if report_drop:
                try:
                    self._on_drop((item,), REASON_CLOSED if self._closing else REASON_BUFFER_FULL)
                except Exception:  # noqa: BLE001 - the request path never raises
                    pass
            return False
        items.append(item)
        if len(items) == self._batch_size:
            self._wake.set()
        return True

    def __len__(self) -> int:
        """Items buffered now."""
        return len(self._items)

    def has_room(self) -> bool:
        """Whether :meth:`offer` would accept an item now (outside the reserve)."""
        return len(self._items) < self._capacity and not self._closing

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive()

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything buffered now; ``True`` when done within ``timeout``.

        Raises :class:`WorkerDiedError` if the worker thread has died.
        """
        with self._done:
            self._requested_generation += 1
            target = self._requested_generation
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self._exported_generation < target:
                if self._died is not None or not self._thread.is_alive():
                    raise WorkerDiedError("serve_journal flusher thread died") from self._died
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._done.wait(timeout=0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. Closing twice is harmless. ``True`` when all was exported."""
        if self._closed:
            return True
        try:
            flushed = self.flush(timeout)
        except WorkerDiedError:
            flushed = False
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=timeout)
        leftover = self._drain(len(self._items))
        if leftover:
            self._on_drop(leftover, REASON_CLOSED)
        self._closed = True
        return flushed and not leftover

    # -- worker thread ------------------------------------------------------------------------

    def _drain(self, limit: int) -> list[Any]:
        items = self._items
        out = []
        popleft = items.popleft
        for _ in range(min(limit, len(items))):
            try:
                out.append(popleft())
            except IndexError:
                break
        return out

    def _downstream_ready(self) -> bool:
        if self._ready is None:
            return True
        try:
            return bool(self._ready())
        except Exception:  # noqa: BLE001 - a broken gate must not stop exports; send reports errors
            logger.warning("serve_journal: the export gate raised; exporting anyway", exc_info=True)
            return True

    def _export_all(self) -> bool:
        """Export what is buffered; ``False`` when the gate held items back."""
        while self._items:
            if not self._downstream_ready():
                return False
            batch = self._drain(self._batch_size)
            if not batch:
                break
            try:
                self._export(batch)
            except Exception:  # noqa: BLE001 - counted below; the message never carries entry data
                logger.exception("serve_journal: exporting a batch of %d entries failed", len(batch))
                self._on_drop(batch, REASON_EXPORT_FAILED)
        return True

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for task in self._periodic:
            if now >= task.next_at:
                task.next_at = now + task.interval_s
                try:
                    task.fn()
                except Exception:  # noqa: BLE001
                    logger.warning("serve_journal: periodic task %s failed", task.name, exc_info=True)

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self._interval_s)
                self._wake.clear()
                with self._done:
                    generation = self._requested_generation
                if self._export_all():
                    with self._done:
                        self._exported_generation = max(self._exported_generation, generation)
                        self._done.notify_all()
                if self._closing:
                    return
                self._run_periodic()
        except BaseException as exc:  # pragma: no cover - reported loudly to flush/close callers
            self._died = exc
            logger.critical("serve_journal flusher thread died", exc_info=True)
            with self._done:
                self._done.notify_all()
            raise
