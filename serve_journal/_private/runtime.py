"""The journal of one replica process, assembled and run: :class:`JournalRuntime`.

The runtime owns the parts :func:`~serve_journal._private.wiring.wire` built from the config,
the request path (:class:`~serve_journal._private.capture.CallCapture`), the buffer and its
flusher thread (:class:`~serve_journal._private.batching.BatchWorker`, exporting through
:class:`~serve_journal._private.export.BatchExporter`), and the flusher's periodic tasks: model
alias refresh, sequence lease, counters flush, metrics report and the heartbeat to the
journal's coordinator. It also reports this producer's counters and flushes and closes the whole.

The request path offers calls through :class:`~serve_journal._private.counters.LeasedBuffer`:
a call is answered only within a sequence lease already durable in the signed counters chain
(the first lease is written before the replica serves; a small thread extends it in the
background, apart from the flusher, so a slow transport never holds it up),
and a clean close writes the closed mark. So a killed replica's loss is bounded and shown.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from serve_journal.config import JournalConfig
from serve_journal.registry import ModelInfo, ModelRef, resolve_model

from .batching import BatchWorker, PeriodicTask
from .capture import REQUEST_IDS, CallCapture
from .counters import LeasedBuffer
from .export import BatchExporter
from .models import register_runtime, remember, unregister_runtime
from .wiring import wire

logger = logging.getLogger("serve_journal")

COUNTERS_INTERVAL_S = 2.0
METRICS_INTERVAL_S = 5.0
MAX_REFRESH_CHECK_S = 60.0
"""The registry refresh task checks at least this often whether ``registry_refresh_s`` passed."""
STALE_WARNING_INTERVAL_S = 600.0
"""At most one warning per replica this often while the alias names another version."""


class JournalRuntime:
    """Everything the journal runs inside one replica process."""

    def __init__(self, config: JournalConfig) -> None:
        self.config = config
        parts = wire(config)
        self.identity = parts.identity
        self.storage = parts.storage
        self.transport = parts.transport
        self.finalizer = parts.finalizer
        self.metrics = parts.metrics
        self.jwt = parts.jwt
        self._accounting = parts.counters
        self.counters = parts.counters.exact
        self.drops = parts.counters.drops
        self.transport_drops: dict[str, int] = parts.counters.transport_drops.by_reason
        self.registry_errors = 0
        self.model_stale = False
        """The alias the serving model was loaded from now names another version."""
        self._model_lock = threading.Lock()
        self._model_ref = config.model
        self._model_ref_version = config.model_version
        self._pinned_by_load = False
        self._last_stale_warning = -STALE_WARNING_INTERVAL_S
        self._last_refresh = time.monotonic()
        self._coordinator: Any = None
        self._closed = False
        self._exporter = BatchExporter(parts.finalizer, parts.counters, parts.metrics,
                                       parts.transport)
        periodic = [
            PeriodicTask("registry-refresh", min(config.registry_refresh_s, MAX_REFRESH_CHECK_S),
                         self._maybe_refresh),
            PeriodicTask("counters", COUNTERS_INTERVAL_S, self._flush_counters),
            PeriodicTask("metrics", METRICS_INTERVAL_S, self._report_metrics),
            # Request ids for calls outside Serve, formatted here rather than on the request path.
            PeriodicTask("request-ids", 0.0, REQUEST_IDS.top_up),
        ]
        if self._reports_heartbeats:
            from .coordinator import HEARTBEAT_INTERVAL_S  # inside: imports Ray (~2 s)

            periodic.append(PeriodicTask("heartbeat", HEARTBEAT_INTERVAL_S, self.heartbeat))
        self.worker = BatchWorker(
            self._exporter,
            capacity=config.buffer_capacity,
            batch_size=config.flush_batch_size,
            interval_s=config.flush_interval(),
            on_drop=self.drops,
            reserve=config.reserve_capacity,
            periodic=periodic,
            # Backpressure: a transport that cannot take more holds the flusher, not the entries.
            ready=getattr(parts.transport, "has_room", None),
            start=False,
        )
        self._lease_model = parts.model.name
        try:  # the first lease, durable before the first answer
            self._accounting.extend_lease(0, self._lease_model)
        except Exception:  # noqa: BLE001 - calls wait, drop (counted) or are refused until it is
            logger.warning("serve_journal: writing the first sequence lease failed; the flusher "
                           "retries", exc_info=True)
        buffer = LeasedBuffer(self.worker.offer, parts.counters, self.drops)
        self.capturer = CallCapture(parts.model, buffer, parts.finalizer, self.drops,
                                    parts.metrics, parts.jwt, config.on_invalid_caller)
        # Everything the flusher's tasks reach exists now: start it, and the lease keeper.
        self.worker.start()
        self._accounting.start_lease_keeper(lambda: self.capturer.captured, self._lease_model)
        # The request-path entry points, bound once (no extra call per request).
        self.capture = self.capturer.capture
        self.check_caller = self.capturer.check_caller
        self.wait_for_room = self.capturer.wait_for_room
        self.wait_for_room_blocking = self.capturer.wait_for_room_blocking
        self.refuse = self.capturer.refuse
        register_runtime(self)
        if self._reports_heartbeats:
            # Register before serving, so a driver-side flush never overlooks this producer.
            self.heartbeat()

    def __repr__(self) -> str:
        return f"JournalRuntime(producer_id={self.identity.producer_id!r}, model={self.model.name!r})"

    @property
    def _reports_heartbeats(self) -> bool:
        return self.config.transport != "memory"

    @property
    def model(self) -> ModelInfo:
        """The model version calls are attributed to now."""
        return self.capturer.model

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    @property
    def captured(self) -> int:
        """Calls captured on the request path."""
        return self.capturer.captured

    @property
    def refused(self) -> int:
        """Requests refused because their entry could not be journaled."""
        return self.capturer.refused

    @property
    def exported(self) -> int:
        """Calls finalized and handed to the transport (or sampled out)."""
        return self._exporter.exported

    # -- periodic tasks (flusher thread) -------------------------------------------------------

    def _flush_counters(self) -> None:
        self._accounting.flush()


    def _report_metrics(self) -> None:
        self.metrics.set_buffer_depth(len(self.worker), self.config.buffer_capacity)
        self.metrics.report()

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._last_refresh >= self.config.registry_refresh_s:
            self.refresh_model()

    def pin_model(self, model: ModelInfo, loaded_from: str | None = None) -> None:
        """Attribute this replica's calls to ``model`` from now on: the deployment loaded it
        (:func:`serve_journal.load_model`). ``loaded_from`` is the reference it was loaded by
        (an alias is then watched for moving away from it)."""
        with self._model_lock:
            previous = self.capturer.model
            remember(model)
            self.capturer.model = model
            self._pinned_by_load = True
            if loaded_from is not None:
                self._model_ref, self._model_ref_version = loaded_from, None
            self.model_stale = False
            self.metrics.set_model_stale(False)
        if previous != model:
            logger.info("serve_journal: %s: calls are now attributed to version %s (loaded by "
                        "the deployment)", model.name, model.version)

    def refresh_model(self) -> None:
        """Check the registry for the reference the serving model was loaded by (every
        ``registry_refresh_s`` and on reconfigure).

        It never changes the version calls are attributed to: that follows what the deployment
        loaded. When an alias now names another version than the one serving, the
        ``serve_journal_model_stale`` gauge is 1 and a warning is logged (at most every
        :data:`STALE_WARNING_INTERVAL_S`).
        """
        with self._model_lock:
            self._last_refresh = time.monotonic()
            ref, ref_version = self._model_ref, self._model_ref_version
            serving = self.capturer.model
        parsed = ModelRef.parse(ref, ref_version)
        if parsed.version is not None:
            return  # a fixed version cannot move
        try:
            found = resolve_model(ref, ref_version, self.config.tracking_uri)
        except Exception:  # noqa: BLE001 - keep serving with the version we know
            self.registry_errors += 1
            self.metrics.add_registry_refresh_error()
            logger.warning("serve_journal: checking model %s in the registry failed", ref,
                           exc_info=True)
            return
        with self._model_lock:
            if self.capturer.model is not serving:
                return  # the deployment loaded another model meanwhile
            stale = (found.name, found.version) != (serving.name, serving.version)
            self.model_stale = stale
            self.metrics.set_model_stale(stale)
            now = time.monotonic()
            warn = stale and now - self._last_stale_warning >= STALE_WARNING_INTERVAL_S
            if warn:
                self._last_stale_warning = now
        if warn:
            how = ("reload it with serve_journal.load_model (e.g. in reconfigure)"
                   if self._pinned_by_load else
                   "load the model with serve_journal.load_model so the journal follows what "
                   "serves; entries keep the version resolved at replica start")
            logger.warning("serve_journal: %s now points at version %s, but this replica serves "
                           "version %s and its entries say so; %s", ref, found.version,
                           serving.version, how)

    # -- reporting and lifecycle ---------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Counters of this producer."""
        return {
            "producer_id": self.identity.producer_id,
            "deployment": self.identity.deployment,
            "model": self.model.name,
            "model_version": self.model.version,
            "captured": self.captured,
            "exported": self.exported,
            "dropped": self._accounting.dropped(),
            "buffered": len(self.worker),
            "refused": self.refused,
            "unacked": self.captured - self.exported - self.drops.total,
            "registry_errors": self.registry_errors,
            "unencodable_features": self.finalizer.unencodable_features,
            "as_of": time.time(),
            "closed": self._closed,
        }

    def heartbeat(self) -> None:
        """Send this producer's report to the journal's coordinator (fire and forget)."""
        from serve_journal.transport.actors import pool_id  # inside: imports Ray (~2 s)

        from .coordinator import get_coordinator  # inside: imports Ray (~2 s)

        if self._coordinator is None:
            self._coordinator = get_coordinator(pool_id(self.config.journal_uri),
                                                self.config.writer_namespace)
        report = self.report()
        in_flight = getattr(self.transport, "in_flight", None)
        report["unacked"] += in_flight() if in_flight is not None else 0
        self._coordinator.heartbeat.remote(self.identity.producer_id, report)

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything buffered and wait until the transport has it durable."""
        start = time.monotonic()
        if not self.worker.flush(timeout):
            return False
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        return self.transport.flush(remaining)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush and stop; closing twice is harmless."""
        if self._closed:
            return
        try:
            self.worker.close(timeout)
            self.transport.close(timeout)
            self._accounting.close(self.captured - 1, timeout)
        finally:
            self._closed = True
            unregister_runtime(self)
            if self._reports_heartbeats:
                try:
                    self.heartbeat()
                except Exception:  # noqa: BLE001
                    logger.warning("serve_journal: final heartbeat failed", exc_info=True)
