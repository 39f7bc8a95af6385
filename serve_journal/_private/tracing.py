"""Trace ids of a journaled call: the active OpenTelemetry span, else the W3C ``traceparent``.

On the request path only :func:`active_span_reader`'s reader runs: one context-variable lookup
and a validity check, keeping the span context's two integers (no formatting, no header
parsing). The flusher turns them into hex, or, when no span was active, parses the request's
``traceparent`` header from the scope the call already holds (:func:`trace_ids`).

The header is validated strictly (W3C Trace Context, version ``00``: ``00-<32 hex>-<16 hex>-<2
hex>``, lowercase, neither id all zeros, exactly one such header); anything else is ignored
without a log line, since the value is the caller's. Nothing else from the headers is recorded.

Ray Serve's tracing (``serve.start(tracing_config=TracingConfig(enabled=True))``) attaches a
``replica_handle_request`` span around every sampled request, as a child of the proxy's span
(itself continuing an incoming ``traceparent``); the journal records that span's ids. Serve does
not attach a span for requests its sampler drops: those fall back to the header.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Mapping
from typing import Any

SpanIds = tuple[int, int]
"""(trace id, span id) of a valid span context, as the integers OpenTelemetry keeps."""

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_HEADER = b"traceparent"


def _span_slot() -> tuple[Any, Any, Any, Any] | None:
    """(OpenTelemetry's context module, its runtime context now, the ``ContextVar`` that keeps
    the current context, the span's key in that context) when its default runtime context is in
    use, else ``None`` (a runtime context chosen through ``OTEL_PYTHON_CONTEXT``, or another
    version's internals: the public API is used)."""
    try:
        from opentelemetry import context as otel_context  # inside: optional dependency
        from opentelemetry.context.contextvars_context import (  # inside: optional dependency
            ContextVarsRuntimeContext,
        )
        from opentelemetry.trace.propagation import _SPAN_KEY  # inside: optional dependency

        runtime = otel_context._RUNTIME_CONTEXT
        variable = getattr(runtime, "_current_context", None)
        if type(runtime) is ContextVarsRuntimeContext and isinstance(variable, contextvars.ContextVar) \
                and isinstance(_SPAN_KEY, str):
            return otel_context, runtime, variable, _SPAN_KEY
    except Exception:  # noqa: BLE001 - any surprise: the public API only
        pass
    return None


def active_span_reader() -> Callable[[], SpanIds | None] | None:
    """A reader of the current OpenTelemetry span's ids (``None`` when no valid span is active),
    or ``None`` when ``opentelemetry-api`` is not installed (``pip install
    'serve-journal[tracing]'``). The reader never raises.

    Most requests carry no span: with OpenTelemetry's default runtime context the reader sees
    that from the context variable itself (two lookups) and returns, without the public API's
    frames; a context that holds a span goes through ``get_current_span()`` as before."""
    try:
        from opentelemetry.trace import get_current_span  # inside: optional dependency
    except ImportError:
        return None
    slot = _span_slot()

    def read() -> SpanIds | None:
        try:
            # Still the same runtime context (something may have replaced it since) and no
            # span in the current context: get_current_span() would give INVALID_SPAN.
            if slot is not None and slot[0]._RUNTIME_CONTEXT is slot[1] \
                    and slot[2].get().get(slot[3]) is None:
                return None
            context = get_current_span().get_span_context()
            if context.is_valid:
                return (context.trace_id, context.span_id)
        except Exception:  # noqa: BLE001 - a broken tracer must not break capture
            pass
        return None

    return read


def parse_traceparent(value: str | bytes | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C ``traceparent`` value of version ``00``, or ``None``
    when it is anything else (malformed, another version, an all-zero id)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    trace_id, span_id = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id


def header_trace_ids(scope: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The ids of the request's ``traceparent`` header (ASGI ``scope``), or ``None`` when it has
    none, several, or an invalid one."""
    if not scope:
        return None
    found = None
    for key, value in scope.get("headers") or ():
        try:
            if key.lower() != _HEADER:
                continue
        except AttributeError:
            continue
        if found is not None:  # W3C: several traceparent headers are invalid together
            return None
        found = value
    return parse_traceparent(found)


def trace_ids(span: SpanIds | None, scope: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """The ``trace_id`` and ``span_id`` columns of one call: the span read on the request path,
    else the ``traceparent`` header of its scope, else nulls."""
    if span is not None:
        trace_id, span_id = span
        if 0 < trace_id < 1 << 128 and 0 < span_id < 1 << 64:
            return f"{trace_id:032x}", f"{span_id:016x}"
    ids = header_trace_ids(scope)
    return ids if ids is not None else (None, None)

