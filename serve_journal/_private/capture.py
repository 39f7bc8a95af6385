"""The request path of a journaled call: annotations, caller check, capture and overflow.

:class:`CallCapture` offers each call to the replica's buffer as one
:class:`~serve_journal._private.entries.CapturedCall` (references only, O(1), never raising).
When the buffer is full, the call's risk tier decides: drop it (counted), wait for room up to
the tier's timeout, or refuse the request (fail-closed: HTTP 503, or
:class:`~serve_journal.errors.JournalUnavailableError` for a handle call) after journaling the
refusal in the reserve room. With JWT callers configured it also verifies the caller before the
model runs.

:class:`JournaledCall` is the before/after logic of one call, shared by the sync and the async
method wrappers (:mod:`serve_journal._private.wrapper`): they differ only in how they call the
method and wait for room.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_journal.errors import JournalUnavailableError
from serve_journal.metrics import JournalMetrics
from serve_journal.policy import OVERFLOW_DROP, OVERFLOW_WAIT
from serve_journal.privacy.identity import CallerRejected, JwtVerifier
from serve_journal.registry import ModelInfo
from serve_journal.schema import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_REJECTED

from .annotations import ANNOTATIONS as _ANNOTATIONS
from .batching import REASON_BUFFER_FULL, BatchWorker
from .counters import DropCounter
from .entries import CapturedCall, EntryFinalizer
from .models import check_models_annotation
from .tracing import active_span_reader

logger = logging.getLogger("serve_journal")

ANNOTATION_KEYS = frozenset(
    {"subject", "features", "caller", "score", "decision", "threshold", "outputs", "explanation_ref",
     "attributes", "model_name", "model_version", "models"}
)
ROOM_POLL_S = 0.002
"""Poll interval while a call waits for buffer room (a deadline-bounded wait, not a retry)."""
REASON_WAIT_TIMEOUT = "wait_timeout"
REASON_REFUSAL_UNJOURNALED = "refusal_unjournaled"
REFUSAL_REASON = "journal_full"
REFUSAL_MESSAGE = ("journal unavailable: this decision is high-risk and is not served "
                   "unjournaled; retry later")


def annotate(**values: Any) -> None:
    """Record facts about the current call from inside a journaled method.

    Keys: ``subject``, ``features``, ``caller``, ``score``, ``decision``, ``threshold``,
    ``outputs``, ``explanation_ref``. They override what the extractors would find.

    ``model_name`` and ``model_version`` name the model that decided this call, for deployments
    that route between models (the full identity is recorded when that version was loaded with
    :func:`serve_journal.load_model`); ``models`` lists further models that took part (loaded
    models, or ``{"name", "version", "role"}`` mappings with role ``decision`` or ``shadow``).
    Models loaded with ``load_model`` record themselves when called; these keys are for the rest.

    ``attributes`` is a mapping of request attribute names to string values (``{"region": "eu"}``)
    that risk rules with an ``attributes`` condition match; several calls add up. Attributes
    only choose the risk tier: they are never written to the journal. Outside a journaled call
    this does nothing.
    """
    unknown = set(values) - ANNOTATION_KEYS
    if unknown:
        raise TypeError(f"annotate() got unknown keys {sorted(unknown)}; known: {sorted(ANNOTATION_KEYS)}")
    attributes = values.pop("attributes", None)
    if attributes is not None:
        _check_attributes(attributes)
    if values.get("models") is not None:
        check_models_annotation(values["models"])
        values["models"] = list(values["models"])
    for key in ("model_name", "model_version"):
        if values.get(key) is not None and not isinstance(values[key], str | int):
            raise TypeError(f"annotate({key}=...) must be a string, got {type(values[key]).__name__}")
    current = _ANNOTATIONS.get()
    if current is not None:
        if values.get("models") and current.get("models"):
            values["models"] = current["models"] + values["models"]
        current.update(values)
        if attributes:
            current["attributes"] = {**current.get("attributes", {}), **attributes}


def _check_attributes(attributes: Any) -> None:
    if not isinstance(attributes, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in attributes.items()):
        raise TypeError("annotate(attributes=...) must be a mapping of attribute names to string "
                        "values, e.g. {'region': 'eu'}")


REQUEST_IDS_PER_READ = 256
"""Random request ids read from the OS, and formatted, at a time (:class:`RequestIds`)."""
REQUEST_IDS_AHEAD = 8192
"""Request ids the flusher keeps formatted ahead of the request path (:meth:`RequestIds.top_up`)."""


class RequestIds:
    """Random version-4 UUIDs as 32 hex digits (``uuid.uuid4().hex``), read from the OS and
    formatted :data:`REQUEST_IDS_PER_READ` at a time, ahead of the request path.

    ``uuid.uuid4()`` reads 16 bytes with ``os.urandom``, which gives up the GIL for the system
    call: on the request path that handed the replica's thread to the flusher, for up to a pacer
    slice, on every call without a Serve request id (docs/benchmarks.md, Findings). Formatting
    one id from a 128-bit integer cost another ~1 us of the ~6 us a capture took. Here the
    flusher thread keeps up to :data:`REQUEST_IDS_AHEAD` ids ready (:meth:`top_up`, once the
    request path has taken one: calls inside Serve use Serve's id); a call takes the next one
    (a deque pop, atomic). Should the ids run out, the call formats one pool itself. A forked
    child forgets the parent's ready ids, so it never repeats them.
    """

    def __init__(self, per_read: int = REQUEST_IDS_PER_READ, ahead: int = REQUEST_IDS_AHEAD) -> None:
        self._per_read = per_read
        self._ahead = ahead
        self._ready: collections.deque[str] = collections.deque()
        self._used = False

    def forget(self) -> None:
        """Drop the ready ids (a forked child calls this: they are its parent's)."""
        self._ready = collections.deque()
        self._used = False

    def _pool(self) -> list[str]:
        count = self._per_read
        raw = np.frombuffer(os.urandom(16 * count), dtype=np.uint8).reshape(count, 16).copy()
        raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
        raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # variant RFC 4122
        digits = raw.tobytes().hex()
        return [digits[at:at + 32] for at in range(0, 32 * count, 32)]

    def new(self) -> str:
        """A new request id."""
        try:
            return self._ready.pop()
        except IndexError:
            self._used = True
            pool = self._pool()
            rid = pool.pop()
            self._ready.extend(pool)
            return rid

    def top_up(self) -> None:
        """Format ids ahead until :data:`REQUEST_IDS_AHEAD` wait (the flusher's periodic task),
        giving the GIL back between pools; nothing until the request path has taken an id."""
        ready = self._ready
        while self._used and len(ready) < self._ahead:
            ready.extendleft(self._pool())
            time.sleep(0)  # a pool is ~0.1 ms of work: let the event loop in between


REQUEST_IDS = RequestIds()
"""The process's request ids (one source, so a fork forgets them once)."""
os.register_at_fork(after_in_child=REQUEST_IDS.forget)


def serve_request_context() -> Callable[[], Any] | None:
    """Ray Serve's getter of the current request's context, or ``None`` without Serve."""
    try:
        from ray.serve.context import _get_serve_request_context  # inside: imports Ray (~2 s)
    except Exception:  # noqa: BLE001 - without Serve every call gets a fresh request id
        return None
    return _get_serve_request_context


class CallCapture:
    """Request-path side of one replica's journal: capture, caller check, overflow per tier."""

    def __init__(self, model: ModelInfo, worker: BatchWorker, finalizer: EntryFinalizer,
                 drops: DropCounter, metrics: JournalMetrics, jwt: JwtVerifier | None,
                 on_invalid_caller: str) -> None:
        self.model = model
        """The model version calls are attributed to (replaced when the alias moves)."""
        self.jwt = jwt
        self.captured = 0
        self.refused = 0
        self._worker = worker
        self._finalizer = finalizer
        self._drops = drops
        self._metrics = metrics
        self._on_invalid_caller = on_invalid_caller
        self._seq = itertools.count()
        self._serve_context = serve_request_context()
        self._active_span = active_span_reader()

    def _request_id(self) -> str:
        """Serve's request id (shared by every deployment one request reaches), else a new one."""
        rid = ""
        if self._serve_context is not None:
            try:
                rid = self._serve_context().request_id
            except Exception:  # noqa: BLE001 - outside Serve
                rid = ""
        return rid or REQUEST_IDS.new()

    def capture(self, args: tuple, kwargs: dict, result: Any, outcome: str, error_type: str | None,
                started: float, annotations: dict | None) -> CapturedCall | None:
        """Offer one captured call to the buffer. O(1); never raises.

        Returns ``None`` when the call was buffered, or dropped and counted. When the buffer is
        full and the call's risk tier says wait or refuse, returns the call: the caller then
        waits for room (:meth:`wait_for_room`) or refuses (:meth:`refuse`).
        """
        try:
            now = time.perf_counter()
            latency_ms = (now - started) * 1000.0
            scope = body = None
            if args and isinstance(args[0], Request):
                request = args[0]
                scope = request.scope
                body = getattr(request, "_body", None)
            call = CapturedCall(
                next(self._seq), time.time_ns() // 1000, self._request_id(), args, kwargs, scope,
                body, result, outcome, error_type, latency_ms, annotations, self.model,
                None if self._active_span is None else self._active_span(),
            )
            self.captured += 1
            if self._worker.offer(call, report_drop=False):
                self._metrics.observe_enqueue_us((time.perf_counter() - now) * 1e6)
                return None
            call.tier = tier = self._finalizer.classify_now(call)
            if tier.overflow == OVERFLOW_DROP:
                self._drops((call,), REASON_BUFFER_FULL)
                return None
            return call
        except Exception:  # noqa: BLE001 - the journal never breaks serving
            logger.exception("serve_journal: capture failed")
            return None

    def check_caller(self, args: tuple, annotations: dict, started: float) -> Any:
        """With JWT callers configured: verify the bearer token of an HTTP call before the model
        runs. Returns ``None`` to go on (the caller recorded in ``annotations``), or the 401
        response after journaling the rejection with its reason."""
        if self.jwt is None or not args or not isinstance(args[0], Request):
            return None
        request = args[0]
        try:
            annotations["caller"] = self.jwt.verify_authorization(request.headers.get("authorization"))
            return None
        except CallerRejected as exc:
            reason = exc.reason
        # An unverified caller is anonymous: a claimed identity (header) is never recorded.
        annotations["caller"] = "anonymous"
        if self._on_invalid_caller == "anonymous":
            return None
        self.keep_unserved(self.capture(args, {}, None, OUTCOME_REJECTED, f"caller_{reason}",
                                        started, annotations))
        return JSONResponse({"error": f"caller rejected: {reason}"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    # -- a full buffer ---------------------------------------------------------------------

    def keep_unserved(self, call: CapturedCall | None) -> None:
        """A call that served no decision (the method raised, or the caller was rejected) met a
        full buffer in a tier that would wait or refuse: there is nothing to refuse, so journal
        it in the reserve room, or count it as dropped. Never leave it uncounted."""
        if call is None:
            return
        if not self._worker.offer(call, report_drop=False, reserved=True):
            self._drops((call,), REASON_BUFFER_FULL)

    def _room_deadline(self, call: CapturedCall) -> float | None:
        """Deadline to wait for room, or ``None`` when the tier refuses at once."""
        if call.tier.overflow == OVERFLOW_WAIT:
            return time.monotonic() + call.tier.timeout_s
        return None

    def _after_wait(self, call: CapturedCall) -> bool:
        """The wait timed out: drop (counted) or refuse, per the tier. ``True`` means refuse."""
        if call.tier.overflow == OVERFLOW_WAIT and call.tier.on_timeout == OVERFLOW_DROP:
            self._drops((call,), REASON_WAIT_TIMEOUT)
            return False
        return True

    async def wait_for_room(self, call: CapturedCall) -> bool:
        """Async wait for buffer room; ``True`` when the call must be refused."""
        deadline = self._room_deadline(call)
        while deadline is not None and time.monotonic() < deadline:
            if self._worker.offer(call, report_drop=False):
                return False
            await asyncio.sleep(ROOM_POLL_S)
        return self._after_wait(call)

    def wait_for_room_blocking(self, call: CapturedCall) -> bool:
        """Blocking wait for buffer room (sync methods run in Serve's thread pool)."""
        deadline = self._room_deadline(call)
        while deadline is not None and time.monotonic() < deadline:
            if self._worker.offer(call, report_drop=False):
                return False
            time.sleep(ROOM_POLL_S)
        return self._after_wait(call)

    def refuse(self, call: CapturedCall) -> Any:
        """Journal the refusal (in the reserve room) and return the 503 response, or raise."""
        self.refused += 1
        self._metrics.add_refused(call.tier.name)
        call.outcome = OUTCOME_REJECTED
        call.error_type = REFUSAL_REASON
        call.result = None
        if not self._worker.offer(call, report_drop=False, reserved=True):
            self._drops((call,), REASON_REFUSAL_UNJOURNALED)
        if call.scope is not None:
            return JSONResponse({"error": REFUSAL_MESSAGE}, status_code=503,
                                headers={"Retry-After": "1"})
        raise JournalUnavailableError(REFUSAL_MESSAGE)


class JournaledCall:
    """The before/after steps of one journaled call; both method wrappers run exactly these::

        call = JournaledCall(capture, args, kwargs)   # annotation scope opened, clock started
        rejection = call.check_caller()               # scope closed when it rejects
        if rejection is not None:
            return rejection
        with call:                                    # an exception is journaled as an error
            result = method(self, *args, **kwargs)    # (or ``await method(...)``)
        return call.finish_blocking(result)           # (or ``await call.finish(result)``)

    ``finish`` journals the result; when the buffer is full it waits for room or refuses, as the
    call's risk tier says. The method's own result or exception is never changed.
    """

    __slots__ = ("_capture", "_token", "annotations", "args", "kwargs", "started")

    def __init__(self, capture: CallCapture, args: tuple, kwargs: dict) -> None:
        self._capture = capture
        self.args = args
        self.kwargs = kwargs
        self.annotations: dict = {}
        self._token = _ANNOTATIONS.set(self.annotations)
        self.started = time.perf_counter()

    def check_caller(self) -> Any:
        """Before the method: the rejection response for an unverified caller, else ``None``."""
        if self._capture.jwt is None:
            return None
        rejection = self._capture.check_caller(self.args, self.annotations, self.started)
        if rejection is not None:
            self._close()
        return rejection

    def _close(self) -> None:
        _ANNOTATIONS.reset(self._token)

    def __enter__(self) -> JournaledCall:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        """After the method: journal an exception (it still propagates); close the scope."""
        try:
            if exc_type is not None:
                self._capture.keep_unserved(self._capture.capture(
                    self.args, self.kwargs, None, OUTCOME_ERROR, exc_type.__name__, self.started,
                    self.annotations))
        finally:
            self._close()
        return False

    def _journal(self, result: Any) -> CapturedCall | None:
        return self._capture.capture(self.args, self.kwargs, result, OUTCOME_OK, None,
                                     self.started, self.annotations)

    def finish_blocking(self, result: Any) -> Any:
        """Journal ``result`` (sync method); returns it, or the refusal when refused."""
        pending = self._journal(result)
        if pending is not None and self._capture.wait_for_room_blocking(pending):
            return self._capture.refuse(pending)
        return result

    async def finish(self, result: Any) -> Any:
        """Journal ``result`` (async method); returns it, or the refusal when refused."""
        pending = self._journal(result)
        if pending is not None and await self._capture.wait_for_room(pending):
            return self._capture.refuse(pending)
        return result
