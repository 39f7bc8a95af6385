"""What a user would write instead of serve_journal: the baseline audit trails.

* :class:`JsonLinesFsyncLog` - one JSON line per prediction, ``write`` + ``flush`` + ``fsync``
  synchronously (durable per request, as an audit trail must be).
* :class:`QueueHandlerJsonLog` - stdlib ``logging`` with a ``QueueHandler``: the request thread
  builds the JSON line and enqueues it, a ``QueueListener`` thread writes the file (no fsync).
* :class:`MlflowTraceLog` - MLflow tracing (``mlflow.start_span``) into a local sqlite store.

Each baseline logs what users log: the request with its raw features and subject id. They only
ever run on synthetic data in a temporary directory the benchmark deletes afterwards. The
``*Fraud`` classes are Serve deployments: the fraud model with the baseline wrapped around it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import time
import uuid
from typing import Any

from serve_journal.examples.fraud import FraudModel


def log_record(request_id: str, body: Any, result: Any, latency_ms: float,
               model_version: str = "1") -> dict[str, Any]:
    """The record a user would log for one prediction (raw request included)."""
    return {"ts": time.time(), "request_id": request_id, "model": "fraud",
            "model_version": model_version, "request": body, "response": result,
            "latency_ms": round(latency_ms, 3)}


class JsonLinesFsyncLog:
    """One JSON line per call, written, flushed and fsynced before the call returns."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._fd = self._fh.fileno()

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class QueueHandlerJsonLog:
    """stdlib logging: ``QueueHandler`` on the request path, a listener thread writing the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, self._file)
        self._logger = logging.getLogger(f"bench.audit.{uuid.uuid4().hex[:8]}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler = logging.handlers.QueueHandler(self._queue)
        self._logger.addHandler(self._handler)
        self._listener.start()

    def log(self, record: dict[str, Any]) -> None:
        self._logger.info(json.dumps(record))

    def close(self) -> None:
        if self._listener._thread is not None:
            self._listener.stop()
        self._logger.removeHandler(self._handler)
        self._file.close()


class MlflowTraceLog:
    """MLflow tracing into a local sqlite tracking store (no network)."""

    def __init__(self, tracking_uri: str, experiment: str = "audit-baseline") -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)

    def span(self, name: str = "predict"):
        """A context manager span; set inputs/outputs on what it yields."""
        return self._mlflow.start_span(name=name)

    def log(self, record: dict[str, Any]) -> None:
        with self._mlflow.start_span(name="predict") as span:
            span.set_inputs(record["request"])
            span.set_outputs(record["response"])
            span.set_attribute("request_id", record["request_id"])

    def close(self) -> None:
        flush = getattr(self._mlflow, "flush_trace_async_logging", None)
        if flush is not None:
            flush()


def _request_id(request: Any) -> str:
    if isinstance(request, dict):
        return uuid.uuid4().hex
    return request.headers.get("x-request-id") or uuid.uuid4().hex


async def _body(request: Any) -> Any:
    return request if isinstance(request, dict) else await request.json()


class BenchFraud(FraudModel):
    """The fraud model, callable over HTTP (a Starlette request) or a handle (the body dict)."""

    async def __call__(self, request) -> dict[str, Any]:
        from serve_journal.examples.fraud import score_features

        body = await _body(request)
        score = score_features(self.model, body["features"])
        return {"score": round(score, 6), "decision": "block" if score >= self.threshold else "allow"}


class JsonFsyncFraud(BenchFraud):
    """The fraud model plus one fsynced JSON line per request, written on the request path."""

    def __init__(self, log_path: str, tracking_uri: str | None = None) -> None:
        super().__init__(tracking_uri)
        self._log = JsonLinesFsyncLog(log_path)

    async def __call__(self, request) -> dict[str, Any]:
        started = time.perf_counter()
        result = await super().__call__(request)
        body = await _body(request)
        self._log.log(log_record(_request_id(request), body, result,
                                 (time.perf_counter() - started) * 1000))
        return result


class QueueLogFraud(BenchFraud):
    """The fraud model plus a JSON log line through a stdlib ``QueueHandler``."""

    def __init__(self, log_path: str, tracking_uri: str | None = None) -> None:
        super().__init__(tracking_uri)
        self._log = QueueHandlerJsonLog(log_path)

    async def __call__(self, request) -> dict[str, Any]:
        started = time.perf_counter()
        result = await super().__call__(request)
        body = await _body(request)
        self._log.log(log_record(_request_id(request), body, result,
                                 (time.perf_counter() - started) * 1000))
        return result


class MlflowTracedFraud(BenchFraud):
    """The fraud model with MLflow tracing around each prediction (local sqlite trace store)."""

    def __init__(self, trace_uri: str, tracking_uri: str | None = None) -> None:
        super().__init__(tracking_uri)  # loads the model from the registry first
        self._trace = MlflowTraceLog(trace_uri)

    async def __call__(self, request) -> dict[str, Any]:
        with self._trace.span() as span:
            result = await super().__call__(request)
            span.set_inputs(await _body(request))
            span.set_outputs(result)
            span.set_attribute("request_id", _request_id(request))
        return result


__all__ = [
    "BenchFraud", "JsonFsyncFraud", "JsonLinesFsyncLog", "MlflowTraceLog", "MlflowTracedFraud", "QueueHandlerJsonLog",
    "QueueLogFraud", "log_record",
]
