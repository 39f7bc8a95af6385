"""The current journaled call's annotations: one home for the context variable.

:class:`~serve_journal._private.capture.JournaledCall` opens a mapping for each call;
``annotate()`` and loaded models (:mod:`serve_journal._private.models`) add to it from inside the
deployment's method. It lives apart from ``capture.py`` so both can import it without a cycle.
"""

from __future__ import annotations

import contextvars

ANNOTATIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "serve_journal_annotations", default=None
)


def current_annotations() -> dict | None:
    """The annotations of the journaled call in progress, or ``None`` outside one."""
    return ANNOTATIONS.get()
