"""The ``@journaled`` wrapper and the per-replica journal runtime.

The wrapper subclasses the user's deployment class. Its ``__init__`` starts a
:class:`JournalRuntime` (model resolution, buffer, flusher thread, transport) before the user's
own ``__init__``; each journaled method is wrapped so that, after the user's method returns or
raises, one :class:`CapturedCall` is offered to the buffer. The wrapper never changes the
method's result or exception.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pyarrow.compute import equal as pc_equal

from serve_journal.config import ConfigError, JournalConfig
from serve_journal.counters import DROPPED, CounterSet
from serve_journal.errors import JournalUnavailableError
from serve_journal.policy import (
    OVERFLOW_DROP,
    OVERFLOW_WAIT,
    Sampler,
    build_policy,
    derive_sampling_key,
)
from serve_journal.registry import ModelInfo, resolve_model
from serve_journal.schema import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_REJECTED
from serve_journal.storage import open_storage

from .batching import REASON_BUFFER_FULL, PeriodicTask
from .entries import CapturedCall, EntryFinalizer, ReplicaIdentity
from .metrics import JournalMetrics

logger = logging.getLogger("serve_journal")

_ANNOTATIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "serve_journal_annotations", default=None
)
_ANNOTATION_KEYS = frozenset(
    {"subject", "features", "caller", "score", "decision", "threshold", "outputs", "explanation_ref"}
)

WARN_EVERY_S = 10.0
COUNTERS_INTERVAL_S = 2.0
METRICS_INTERVAL_S = 5.0
ROOM_POLL_S = 0.002
REASON_WAIT_TIMEOUT = "wait_timeout"
REASON_REFUSAL_UNJOURNALED = "refusal_unjournaled"
REFUSAL_REASON = "journal_full"


def annotate(**values: Any) -> None:
    """Record facts about the current call from inside a journaled method.

    Keys: ``subject``, ``features``, ``caller``, ``score``, ``decision``, ``threshold``,
    ``outputs``, ``explanation_ref``. They override what the extractors would find. Outside a
    journaled call this does nothing.
    """
    unknown = set(values) - _ANNOTATION_KEYS
    if unknown:
        raise TypeError(f"annotate() got unknown keys {sorted(unknown)}; known: {sorted(_ANNOTATION_KEYS)}")
    current = _ANNOTATIONS.get()
    if current is not None:
        current.update(values)


def starlette_request_type() -> type | tuple:
    """Starlette's Request class (what Serve passes for HTTP calls), or () when absent."""
    try:
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - Serve depends on starlette
        return ()
    return Request


def _request_id() -> str:
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside Serve
        rid = ""
    return rid or uuid.uuid4().hex


def _replica_names() -> tuple[str | None, str, str]:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        rid = ctx.replica_id
        return ctx.app_name, rid.deployment_id.name, rid.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (plain class, tests)
        return None, "local", f"pid{os.getpid()}"


class _DropCounter:
    """Counts every drop with its reason: in the exact counters (so verify can explain the
    sequence gap), in metrics, and in a per-reason total for reports; warns, rate-limited."""

    def __init__(self, counters: CounterSet, metrics: JournalMetrics, default_tier: str) -> None:
        self.by_reason: dict[str, int] = {}
        self._counters = counters
        self._metrics = metrics
        self._default_tier = default_tier
        self._lock = threading.Lock()
        self._last_warning = 0.0

    def __call__(self, items: Sequence[CapturedCall], reason: str) -> None:
        for item in items:
            tier = item.tier.name if item.tier is not None else self._default_tier
            rate = item.tier.sample_rate if item.tier is not None else 1.0
            self._counters.record(item.model.name, item.model.version, item.ts_us, None, tier,
                                  rate, item.outcome, item.seq, DROPPED, reason)
            self._metrics.add_dropped(reason, tier)
        with self._lock:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + len(items)
            now = time.monotonic()
            warn = now - self._last_warning >= WARN_EVERY_S
            if warn:
                self._last_warning = now
        if warn:
            logger.warning("serve_journal: dropped journal entries (%s so far: %s)",
                           sum(self.by_reason.values()), dict(self.by_reason))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


REFUSAL_MESSAGE = ("journal unavailable: this decision is high-risk and is not served "
                   "unjournaled; retry later")


class JournalRuntime:
    """Everything the journal runs inside one replica process."""

    def __init__(self, config: JournalConfig) -> None:
        from .batching import BatchWorker

        self.config = config
        self.model: ModelInfo = resolve_model(config.model, config.model_version, config.tracking_uri)
        self._model_lock = threading.Lock()
        self._last_refresh = time.monotonic()
        app, deployment, replica = _replica_names()
        self.identity = ReplicaIdentity(
            producer_id=f"{deployment}-{replica}-{uuid.uuid4().hex[:8]}",
            app_name=app, deployment=deployment, replica=replica,
        )
        self._seq = itertools.count()
        self._request_type = starlette_request_type()
        self.captured = 0
        self.exported = 0
        self.refused = 0
        self.registry_errors = 0
        pseudonymizer, sampling_key = build_privacy(config)
        policy = build_policy(config.risk_policy)
        self.counters = CounterSet(self.identity.producer_id)
        self.metrics = JournalMetrics(self.model.name, deployment, replica)
        self.drops = _DropCounter(self.counters, self.metrics, policy.default_tier.name)
        self.storage = open_storage(config.journal_uri, retention=config.retention)
        self.transport_drops: dict[str, int] = {}
        self.transport = build_transport(config, self.identity.producer_id, self._on_transport_drop)
        self.finalizer = EntryFinalizer(config, pseudonymizer, self.identity,
                                        Sampler(policy, sampling_key))
        self.jwt = None
        if config.caller_jwt_public_key is not None:
            from serve_journal.privacy.identity import JwtVerifier

            self.jwt = JwtVerifier(config.jwt_public_key_pem(), issuer=config.caller_jwt_issuer,
                                   audience=config.caller_jwt_audience)
        self._coordinator = None
        self._closed = False
        periodic = [
            PeriodicTask("registry-refresh", min(config.registry_refresh_s, 60.0), self._maybe_refresh),
            PeriodicTask("counters", COUNTERS_INTERVAL_S, self._flush_counters),
            PeriodicTask("metrics", METRICS_INTERVAL_S, self._report_metrics),
        ]
        if config.transport != "memory":
            periodic.append(PeriodicTask("heartbeat", _heartbeat_interval(), self.heartbeat))
        self.worker = BatchWorker(
            self._export,
            capacity=config.buffer_capacity,
            batch_size=config.flush_batch_size,
            interval_s=config.flush_interval_s,
            on_drop=self.drops,
            reserve=config.reserve_capacity,
            periodic=periodic,
        )
        if config.transport != "memory":
            # Register before serving, so a driver-side flush never overlooks this producer.
            self.heartbeat()

    def __repr__(self) -> str:
        return f"JournalRuntime(producer_id={self.identity.producer_id!r}, model={self.model.name!r})"

    # -- request path -------------------------------------------------------------------------

    def capture(self, args: tuple, kwargs: dict, result: Any, outcome: str, error_type: str | None,
                started: float, annotations: dict | None) -> CapturedCall | None:
        """Offer one captured call to the buffer. O(1); never raises.

        Returns ``None`` when the call was buffered, or dropped and counted. When the buffer is
        full and the call's risk tier says wait or refuse, returns the call: the wrapper then
        waits for room (:meth:`wait_for_room`) or refuses (:meth:`refuse`).
        """
        try:
            now = time.perf_counter()
            latency_ms = (now - started) * 1000.0
            scope = body = None
            if args and isinstance(args[0], self._request_type):
                request = args[0]
                scope = request.scope
                body = getattr(request, "_body", None)
            call = CapturedCall(
                next(self._seq), time.time_ns() // 1000, _request_id(), args, kwargs, scope, body,
                result, outcome, error_type, latency_ms, annotations, self.model,
            )
            self.captured += 1
            if self.worker.offer(call, report_drop=False):
                self.metrics.observe_enqueue_us((time.perf_counter() - now) * 1e6)
                return None
            call.tier = tier = self.finalizer.classify_now(call)
            if tier.overflow == OVERFLOW_DROP:
                self.drops((call,), REASON_BUFFER_FULL)
                return None
            return call
        except Exception:  # noqa: BLE001 - the journal never breaks serving
            logger.exception("serve_journal: capture failed")
            return None

    def check_caller(self, args: tuple, annotations: dict, started: float) -> Any:
        """With JWT callers configured: verify the bearer token of an HTTP call before the model
        runs. Returns ``None`` to go on (the caller recorded in ``annotations``), or the 401
        response after journaling the rejection with its reason."""
        if self.jwt is None or not args or not isinstance(args[0], self._request_type):
            return None
        from serve_journal.privacy.identity import CallerRejected

        request = args[0]
        try:
            annotations["caller"] = self.jwt.verify_authorization(request.headers.get("authorization"))
            return None
        except CallerRejected as exc:
            reason = exc.reason
        # An unverified caller is anonymous: a claimed identity (header) is never recorded.
        annotations["caller"] = "anonymous"
        if self.config.on_invalid_caller == "anonymous":
            return None
        self.capture(args, {}, None, OUTCOME_REJECTED, f"caller_{reason}", started, annotations)
        from starlette.responses import JSONResponse

        return JSONResponse({"error": f"caller rejected: {reason}"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    def _room_deadline(self, call: CapturedCall) -> float | None:
        """Deadline to wait for room, or ``None`` when the tier refuses at once."""
        if call.tier.overflow == OVERFLOW_WAIT:
            return time.monotonic() + call.tier.timeout_s
        return None

    def _after_wait(self, call: CapturedCall) -> bool:
        """The wait timed out: drop (counted) or refuse, per the tier. ``True`` means refuse."""
        if call.tier.overflow == OVERFLOW_WAIT and call.tier.on_timeout == OVERFLOW_DROP:
            self.drops((call,), REASON_WAIT_TIMEOUT)
            return False
        return True

    async def wait_for_room(self, call: CapturedCall) -> bool:
        """Async wait for buffer room; ``True`` when the call must be refused."""
        import asyncio

        deadline = self._room_deadline(call)
        while deadline is not None and time.monotonic() < deadline:
            if self.worker.offer(call, report_drop=False):
                return False
            await asyncio.sleep(ROOM_POLL_S)
        return self._after_wait(call)

    def wait_for_room_blocking(self, call: CapturedCall) -> bool:
        """Blocking wait for buffer room (sync methods run in Serve's thread pool)."""
        deadline = self._room_deadline(call)
        while deadline is not None and time.monotonic() < deadline:
            if self.worker.offer(call, report_drop=False):
                return False
            time.sleep(ROOM_POLL_S)
        return self._after_wait(call)

    def refuse(self, call: CapturedCall) -> Any:
        """Journal the refusal (in the reserve room) and return the 503 response, or raise."""
        self.refused += 1
        self.metrics.add_refused(call.tier.name)
        call.outcome = OUTCOME_REJECTED
        call.error_type = REFUSAL_REASON
        call.result = None
        if not self.worker.offer(call, report_drop=False, reserved=True):
            self.drops((call,), REASON_REFUSAL_UNJOURNALED)
        if call.scope is not None:
            from starlette.responses import JSONResponse

            return JSONResponse({"error": REFUSAL_MESSAGE}, status_code=503,
                                headers={"Retry-After": "1"})
        raise JournalUnavailableError(REFUSAL_MESSAGE)

    # -- background ---------------------------------------------------------------------------

    def _export(self, calls: list[CapturedCall]) -> None:
        started = time.perf_counter()
        fin = self.finalizer.finalize(calls)
        self.counters.record_batch(
            [m.name for m in fin.models], [m.version for m in fin.models],
            [c.ts_us for c in calls], fin.decisions, fin.tiers, fin.rates, fin.outcomes,
            [c.seq for c in calls], fin.keep,
        )
        self.metrics.add_batch(fin.tiers, fin.keep)
        batch = fin.batch
        if batch.num_rows == 0:
            self.exported += len(calls)
            return
        delay = 0.05
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self.transport.send(batch)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                logger.warning("serve_journal: transport send failed; retrying", exc_info=True)
                time.sleep(delay)  # back-off between retries of a failed send
                delay = min(delay * 2, 2.0)
        self.exported += len(calls)
        self.metrics.observe_flush_ms((time.perf_counter() - started) * 1000.0)

    def _on_transport_drop(self, reason: str, count: int, entries: Any = None) -> None:
        """The transport dropped entries it had accepted: count them, with their sequence
        numbers when it still has them (then verify can tell this drop from a loss)."""
        self.transport_drops[reason] = self.transport_drops.get(reason, 0) + count
        if entries is None:
            return
        own = entries.filter(pc_equal(entries.column("producer_id"), self.identity.producer_id))
        ts = own.column("ts").cast("int64").to_pylist()
        for model, version, ts_us, decision, tier, rate, outcome, seq in zip(
                own.column("model_name").to_pylist(), own.column("model_version").to_pylist(), ts,
                own.column("decision").to_pylist(), own.column("risk_tier").to_pylist(),
                own.column("sample_rate").to_pylist(), own.column("outcome").to_pylist(),
                own.column("seq").to_pylist(), strict=True):
            self.counters.record(model, version, ts_us, decision, tier, rate, outcome, seq,
                                 DROPPED, reason)
            self.metrics.add_dropped(reason, tier)

    def _flush_counters(self) -> None:
        self.counters.flush_to(self.storage)

    def _report_metrics(self) -> None:
        self.metrics.set_buffer_depth(len(self.worker), self.config.buffer_capacity)
        self.metrics.report()

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._last_refresh >= self.config.registry_refresh_s:
            self.refresh_model()

    def refresh_model(self) -> None:
        """Re-resolve the model alias (on reconfigure and every ``registry_refresh_s``)."""
        with self._model_lock:
            self._last_refresh = time.monotonic()
            try:
                model = resolve_model(self.config.model, self.config.model_version,
                                      self.config.tracking_uri)
            except Exception:  # noqa: BLE001 - keep serving with the version we know
                self.registry_errors += 1
                self.metrics.add_registry_refresh_error()
                logger.warning("serve_journal: refreshing model %s from the registry failed",
                               self.config.model, exc_info=True)
                return
            if model != self.model:
                logger.info("serve_journal: model %s now resolves to version %s",
                            model.name, model.version)
            self.model = model

    def report(self) -> dict[str, Any]:
        """Counters of this producer."""
        return {
            "producer_id": self.identity.producer_id,
            "deployment": self.identity.deployment,
            "model": self.model.name,
            "model_version": self.model.version,
            "captured": self.captured,
            "exported": self.exported,
            "dropped": {**self.drops.by_reason, **self.transport_drops},
            "buffered": len(self.worker),
            "refused": self.refused,
            "unacked": self.captured - self.exported - self.drops.total,
            "registry_errors": self.registry_errors,
            "unencodable_features": self.finalizer.unencodable_features,
            "as_of": time.time(),
            "closed": self._closed,
        }

    def heartbeat(self) -> None:
        from serve_journal.transport.actors import pool_id

        from .coordinator import get_coordinator

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
            self._flush_counters()
        finally:
            self._closed = True
            if self.config.transport != "memory":
                try:
                    self.heartbeat()
                except Exception:  # noqa: BLE001
                    logger.warning("serve_journal: final heartbeat failed", exc_info=True)


def _heartbeat_interval() -> float:
    from .coordinator import HEARTBEAT_INTERVAL_S

    return HEARTBEAT_INTERVAL_S


def build_transport(config: JournalConfig, producer_id: str, on_drop=None):
    """The transport the config names, built inside the replica.

    ``on_drop(reason, count, entries)`` hears of entries a transport accepted and then dropped.
    """
    if config.transport == "actors":
        from serve_journal.sink.settings import SinkSettings
        from serve_journal.transport.actors import RayActorTransport

        return RayActorTransport(
            SinkSettings.from_config(config), pool_size=config.writer_pool_size,
            namespace=config.writer_namespace, producer_id=producer_id,
        )
    if config.transport == "memory":
        from serve_journal.testing import InMemoryTransport

        return InMemoryTransport.shared(config.extra.get("memory_transport", "default"))
    if config.transport == "kafka":
        try:
            from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("transport='kafka' needs aiokafka: pip install aiokafka") from exc
        settings = dict(config.extra.get("kafka", {}))
        # One spool per replica process: a spool directory is never shared. The live replicas
        # on a node drain the spools that dead ones left in the same base directory.
        base = settings.pop("spool_dir", None) or os.path.join(
            os.path.expanduser("~"), ".serve_journal", "spool")
        settings["spool_dir"] = os.path.join(base, producer_id)
        settings.setdefault("client_id", producer_id)
        return KafkaTransport(KafkaSettings.from_mapping(settings), on_drop=on_drop)
    raise ConfigError(f"unknown transport {config.transport!r}")


def build_privacy(config: JournalConfig):
    """(pseudonymizer, sampling key) of a replica: the keyring and the per-subject key vault."""
    from serve_journal.privacy.keyring import PURPOSE_SAMPLING, Keyring
    from serve_journal.privacy.subjects import VaultPseudonymizer
    from serve_journal.privacy.vault import SubjectVault

    directory = config.resolved_privacy_dir()
    keyring = Keyring.local_default(directory)
    if config.vault_url:
        vault = SubjectVault.open(config.vault_url, keyring)
    else:
        vault = SubjectVault.local_default(directory, keyring)
    return (VaultPseudonymizer(keyring, vault),
            derive_sampling_key(keyring.purpose_key(PURPOSE_SAMPLING)))


# -- the decorator ---------------------------------------------------------------------------
# The wrappers below are pickled by value (Ray ships the class to replicas); they reach module
# state only through module-level functions, which pickle by reference.


def _enter_call() -> tuple[dict, contextvars.Token]:
    annotations: dict = {}
    return annotations, _ANNOTATIONS.set(annotations)


def _exit_call(token: contextvars.Token) -> None:
    _ANNOTATIONS.reset(token)


def _wrap_method(name: str, method: Any) -> Any:
    if inspect.isasyncgenfunction(method) or inspect.isgeneratorfunction(method):
        raise ConfigError(
            f"method {name!r} is a generator (streaming response); journaling streams is not "
            "supported: journal a non-streaming method instead"
        )
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def journaled_async(self, *args, **kwargs):
            runtime = self.__dict__.get("_serve_journal_runtime")
            if runtime is None:
                return await method(self, *args, **kwargs)
            annotations, token = _enter_call()
            started = time.perf_counter()
            if runtime.jwt is not None:
                refusal = runtime.check_caller(args, annotations, started)
                if refusal is not None:
                    _exit_call(token)
                    return refusal
            try:
                result = await method(self, *args, **kwargs)
            except BaseException as exc:
                runtime.capture(args, kwargs, None, OUTCOME_ERROR, type(exc).__name__, started,
                                annotations)
                raise
            finally:
                _exit_call(token)
            pending = runtime.capture(args, kwargs, result, OUTCOME_OK, None, started, annotations)
            if pending is not None and await runtime.wait_for_room(pending):
                return runtime.refuse(pending)
            return result

        return journaled_async

    @functools.wraps(method)
    def journaled_sync(self, *args, **kwargs):
        runtime = self.__dict__.get("_serve_journal_runtime")
        if runtime is None:
            return method(self, *args, **kwargs)
        annotations, token = _enter_call()
        started = time.perf_counter()
        if runtime.jwt is not None:
            refusal = runtime.check_caller(args, annotations, started)
            if refusal is not None:
                _exit_call(token)
                return refusal
        try:
            result = method(self, *args, **kwargs)
        except BaseException as exc:
            runtime.capture(args, kwargs, None, OUTCOME_ERROR, type(exc).__name__, started,
                            annotations)
            raise
        finally:
            _exit_call(token)
        pending = runtime.capture(args, kwargs, result, OUTCOME_OK, None, started, annotations)
        if pending is not None and runtime.wait_for_room_blocking(pending):
            return runtime.refuse(pending)
        return result

    return journaled_sync


def wrap_class(user_cls: type, config: JournalConfig) -> type:
    """A subclass of ``user_cls`` (same name) whose methods are journaled."""
    if not inspect.isclass(user_cls):
        raise ConfigError(
            f"@journaled wraps a class-based deployment, got {type(user_cls).__name__}; "
            "turn the function into a class with __call__"
        )
    attrs: dict[str, Any] = {"__module__": user_cls.__module__, "__qualname__": user_cls.__qualname__,
                             "__doc__": user_cls.__doc__, "_serve_journal_config": config}
    for name in config.methods:
        method = getattr(user_cls, name, None)
        if method is None or not callable(method):
            raise ConfigError(f"{user_cls.__name__} has no method {name!r} to journal "
                              f"(methods={config.methods!r})")
        attrs[name] = _wrap_method(name, method)

    user_init = user_cls.__init__

    def __init__(self, *args, **kwargs):
        self._serve_journal_runtime = JournalRuntime(config)
        user_init(self, *args, **kwargs)

    user_reconfigure = getattr(user_cls, "reconfigure", None)

    if user_reconfigure is not None and inspect.iscoroutinefunction(user_reconfigure):
        async def reconfigure(self, user_config):
            await user_reconfigure(self, user_config)
            self._serve_journal_runtime.refresh_model()
    else:
        def reconfigure(self, user_config):
            if user_reconfigure is not None:
                user_reconfigure(self, user_config)
            self._serve_journal_runtime.refresh_model()

    user_del = getattr(user_cls, "__del__", None)

    if user_del is not None and inspect.iscoroutinefunction(user_del):
        async def __del__(self):
            _close_runtime(self)
            await user_del(self)
    else:
        def __del__(self):
            _close_runtime(self)
            if user_del is not None:
                user_del(self)

    attrs.update(__init__=__init__, reconfigure=reconfigure, __del__=__del__)
    functools.update_wrapper(__init__, user_init, assigned=("__doc__",))
    return type(user_cls.__name__, (user_cls,), attrs)


def _close_runtime(instance: Any) -> None:
    runtime = instance.__dict__.get("_serve_journal_runtime")
    if runtime is not None:
        runtime.close()


def journal_runtime(instance: Any) -> JournalRuntime | None:
    """The runtime of a journaled instance (for tests and admin methods)."""
    return instance.__dict__.get("_serve_journal_runtime")
