"""The one retry helper: bounded, exponential back-off, built on tenacity.

:func:`retry_call` retries a call until it succeeds, a deadline passes or attempts run out, then
re-raises the last error. :class:`Backoff` is the same schedule for loops that keep their own
state between tries (a sink partition waiting to write again, a spool drainer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

T = TypeVar("T")


def retry_call(
    fn: Callable[[], T],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    deadline_s: float | None = None,
    attempts: int | None = None,
    delay_s: float = 0.05,
    max_delay_s: float = 2.0,
    logger: logging.Logger | None = None,
    message: str = "retrying",
) -> T:
    """Call ``fn`` until it returns; on an exception of ``retry_on`` wait ``delay_s``, doubling
    up to ``max_delay_s``, and try again while fewer than ``attempts`` tries were made and
    ``deadline_s`` has not passed (at least one bound is required). The last error is re-raised
    as it is. ``logger`` gets a warning with ``message`` before each wait."""
    if deadline_s is None and attempts is None:
        raise ValueError("retry_call needs deadline_s or attempts, or it could retry forever")
    stops = []
    if deadline_s is not None:
        stops.append(tenacity.stop_after_delay(deadline_s))
    if attempts is not None:
        stops.append(tenacity.stop_after_attempt(attempts))
    stop = stops[0] if len(stops) == 1 else tenacity.stop_any(*stops)
    before_sleep = None
    if logger is not None:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            logger.warning("serve_journal: %s (attempt %d)", message, state.attempt_number,
                           exc_info=state.outcome.exception() if state.outcome else None)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=delay_s, min=delay_s, max=max_delay_s),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)


@dataclass
class Backoff:
    """Exponential back-off state: :meth:`next_delay` gives ``initial_s``, then doubles up to
    ``max_s``; :meth:`reset` after a success."""

    initial_s: float
    max_s: float
    _current: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")

    def next_delay(self) -> float:
        """The delay before the next try; each call doubles the following one."""
        delay = self.initial_s if self._current is None else self._current
        self._current = min(delay * 2, self.max_s)
        return delay

    def reset(self) -> None:
        """Back to ``initial_s`` (after a success)."""
        self._current = None
