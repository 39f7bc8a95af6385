"""From captured calls to journal entries: everything the request path must not do.

``CapturedCall`` holds references only (the request's scope and body, the arguments, the
result); it lives in replica memory until the flusher turns it into one row of
``ENTRY_SCHEMA``: parse the JSON body, extract subject, features and outputs, canonical-encode
and HMAC the features, tokenize the subject (and, with ``caller_privacy="token"``, the caller), build
Arrow columns. Raw values never leave this module except as tokens and HMACs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from serve_journal.config import JournalConfig
from serve_journal.integrity.encoding import CanonicalEncodingError, canonical_encode_fast
from serve_journal.policy import RiskTier
from serve_journal.privacy.pseudonymizer import Pseudonymizer
from serve_journal.privacy.tokens import CallerTokenizer
from serve_journal.registry import ModelInfo
from serve_journal.sampling import Sampler
from serve_journal.schema import ENTRY_SCHEMA, OUTCOME_OK, SCHEMA_VERSION

from .models import call_models
from .tracing import SpanIds, trace_ids

logger = logging.getLogger("serve_journal")


class CapturedCall:
    """One call as captured on the request path: references, no processing."""

    __slots__ = (
        "seq", "ts_us", "request_id", "args", "kwargs", "scope", "body", "result",
        "outcome", "error_type", "latency_ms", "annotations", "model", "tier", "span",
    )

    def __init__(self, seq: int, ts_us: int, request_id: str, args: tuple, kwargs: dict,
                 scope: Mapping[str, Any] | None, body: bytes | None, result: Any, outcome: str,
                 error_type: str | None, latency_ms: float, annotations: dict | None,
                 model: ModelInfo, span: SpanIds | None = None) -> None:
        self.seq = seq
        self.ts_us = ts_us
        self.request_id = request_id
        self.args = args
        self.kwargs = kwargs
        self.scope = scope
        self.body = body
        self.result = result
        self.outcome = outcome
        self.error_type = error_type
        self.latency_ms = latency_ms
        self.annotations = annotations
        self.model = model
        self.tier: RiskTier | None = None
        """The tier decided on the request path (full buffer only); else the flusher decides."""
        self.span = span
        """The active OpenTelemetry span's (trace id, span id) at capture, if one was valid."""

    def __repr__(self) -> str:  # never show arguments, bodies or results
        return f"CapturedCall(seq={self.seq}, outcome={self.outcome!r})"


class CallView:
    """What an extractor hook sees of a call: built in the background, and on the request path
    only when the buffer is full and the caller hook must help pick the call's risk tier.

    ``headers`` is decoded from the request's scope the first time it is read (most calls never
    need it: no hook, the caller annotated or in the body)."""

    __slots__ = ("_headers", "_scope", "args", "body", "kwargs", "result")

    def __init__(self, args: tuple, kwargs: dict, body: Any, headers: Mapping[str, str] | None,
                 result: Any, scope: Mapping[str, Any] | None = None) -> None:
        self.args = args
        self.kwargs = kwargs
        self.body = body
        """The parsed JSON body of an HTTP request (or the first positional argument of a handle
        call)."""
        self.result = result
        """The method's return value (parsed JSON for a Starlette response); ``None`` on error."""
        self._headers = headers
        self._scope = scope

    @property
    def headers(self) -> Mapping[str, str]:
        """The request's headers, names lower-cased (empty for handle calls)."""
        if self._headers is None:
            self._headers = _headers(self._scope)
        return self._headers

    def header(self, name: str) -> str | None:
        """One header's value (``name`` lower case), without decoding the others."""
        if self._headers is not None or not self._scope:
            return self.headers.get(name)
        wanted = name.encode("latin-1")
        for key, value in self._scope.get("headers") or ():
            try:
                if key.lower() == wanted:
                    return value.decode("latin-1")
            except (AttributeError, UnicodeDecodeError):
                continue
        return None

    def __repr__(self) -> str:  # never show arguments, bodies or results
        return "CallView(...)"


@dataclass(frozen=True)
class ReplicaIdentity:
    """Names written into every entry of one replica process."""

    producer_id: str
    app_name: str | None
    deployment: str
    replica: str


def _headers(scope: Mapping[str, Any] | None) -> dict[str, str]:
    if not scope:
        return {}
    out = {}
    for key, value in scope.get("headers") or ():
        try:
            out[key.decode("latin-1").lower()] = value.decode("latin-1")
        except (AttributeError, UnicodeDecodeError):
            continue
    return out


def _attributes(call: CapturedCall) -> Mapping[str, Any] | None:
    """The request attributes risk rules match (``annotate(attributes=...)``); never journaled."""
    return call.annotations.get("attributes") if call.annotations else None


_LONG_NUMBER = re.compile(rb"[0-9]{19}")
"""A run of digits that may be an integer orjson would turn into a float (int64/uint64 end at
19/20 digits): such bodies take the json module's path."""


def _json_or_none(data: Any) -> Any:
    if isinstance(data, bytes | bytearray | memoryview):
        if not data:
            return None
        if _LONG_NUMBER.search(data) is None:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        # What orjson refuses and the json module reads (NaN/Infinity literals, lone surrogates,
        # a BOM) and what orjson reads differently (an integer beyond 64 bits becomes a float
        # there): parsed as before orjson, so no entry changes meaning.
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    return data


def _result_value(result: Any) -> Any:
    body = getattr(result, "body", None)
    if body is not None and hasattr(result, "status_code"):
        return _json_or_none(body)
    return result


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def _outputs(value: Any, top_k: int) -> tuple[list[dict] | None, float | None, str | None]:
    """Top-k outputs, score and decision from a result; tolerant of unknown shapes."""
    if type(value) is not dict and not isinstance(value, Mapping):
        score = _as_float(value)
        return (None, score, None)
    score = _as_float(value.get("score"))
    decision = value.get("decision")
    decision = str(decision) if decision is not None else None
    scores = value.get("scores", value.get("probabilities", value.get("outputs")))
    outputs = None
    if isinstance(scores, Mapping):
        pairs = [(str(k), _as_float(v)) for k, v in scores.items()]
        pairs = [(k, v) for k, v in pairs if v is not None]
        pairs.sort(key=lambda kv: (-kv[1] if not math.isnan(kv[1]) else math.inf))
        outputs = [{"label": k, "score": v} for k, v in pairs[:top_k]]
    elif isinstance(scores, Sequence) and not isinstance(scores, str | bytes):
        rows = []
        for item in scores:
            if isinstance(item, Mapping) and "label" in item:
                rows.append({"label": str(item["label"]), "score": _as_float(item.get("score"))})
        outputs = rows[:top_k] or None
    if score is None and outputs:
        score = outputs[0]["score"]
    if outputs is None and score is not None:
        label = value.get("label")
        outputs = [{"label": str(label) if label is not None else "score", "score": score}]
    return outputs, score, decision


def _models_cell(used: list[tuple[ModelInfo, str]] | None) -> list[dict] | None:
    """The ``models`` column of one entry: every model the call used, or null when one did."""
    if used is None:
        return None
    return [{"name": m.name, "version": m.version, "run_id": m.run_id, "digest": m.digest,
             "role": role} for m, role in used]


SLICE = 128
"""Calls classified, sampled or HMACed between two pauses of :meth:`EntryFinalizer.finalize`."""


def _no_pause() -> None:
    return None


@dataclass
class Finalized:
    """A finalized batch: the kept entries, and what the counters need about every call."""

    batch: pa.RecordBatch
    models: list[ModelInfo]
    decisions: list[str | None]
    tiers: list[str]
    rates: list[float]
    outcomes: list[str]
    keep: list[bool]


class EntryFinalizer:
    """Turns captured calls into a RecordBatch of ``ENTRY_SCHEMA``, sampled by the risk policy.

    With a ``caller_tokenizer`` the ``caller`` column holds caller tokens; risk rules and sampling
    still see the caller as given (they run first, in memory).
    """

    def __init__(self, config: JournalConfig, pseudonymizer: Pseudonymizer,
                 identity: ReplicaIdentity, sampler: Sampler,
                 caller_tokenizer: CallerTokenizer | None = None) -> None:
        self.config = config
        self.pseudonymizer = pseudonymizer
        self.caller_tokenizer = caller_tokenizer
        self.identity = identity
        self.sampler = sampler
        self.unencodable_features = 0

    def _view(self, call: CapturedCall) -> CallView:
        if call.scope is not None:
            body = _json_or_none(call.body)
        else:
            body = call.args[0] if call.args else (call.kwargs or None)
        return CallView(call.args, call.kwargs, body, None,
                        _result_value(call.result) if call.outcome == OUTCOME_OK else None,
                        call.scope)

    def _caller(self, call: CapturedCall, view: CallView) -> str:
        caller = call.annotations.get("caller") if call.annotations else None
        if caller is None and self.config.caller is not None:
            caller = self.config.caller(view)
        if caller is None:
            caller = view.header(self.config.caller_header.lower())
        return str(caller) if caller else "anonymous"

    def _subject(self, call: CapturedCall, view: CallView) -> str | None:
        ann = call.annotations or {}
        if "subject" in ann:
            subject = ann["subject"]
        elif self.config.subject is not None:
            subject = self.config.subject(view)
        elif type(view.body) is dict or isinstance(view.body, Mapping):
            subject = view.body.get(self.config.subject_field)
        else:
            subject = None
        return None if subject is None else str(subject)

    def _features(self, call: CapturedCall, view: CallView) -> Any:
        ann = call.annotations or {}
        if "features" in ann:
            return ann["features"]
        if self.config.features is not None:
            return self.config.features(view)
        body = view.body
        if type(body) is dict or isinstance(body, Mapping):
            if self.config.features_field in body:
                return body[self.config.features_field]
            return {k: v for k, v in body.items() if k != self.config.subject_field}
        return body

    def outputs(self, call: CapturedCall, result: Any
                ) -> tuple[list[dict] | None, float | None, str | None, float | None]:
        """(top outputs, score, decision, threshold) of a call from its result and annotations."""
        cfg = self.config
        ann = call.annotations or {}
        if "outputs" in ann or cfg.outputs is not None:
            try:
                result = ann["outputs"] if "outputs" in ann else cfg.outputs(result)
            except Exception as exc:  # noqa: BLE001
                logger.warning("serve_journal: outputs hook raised %s", type(exc).__name__)
                result = None
        outs, score, decision = _outputs(result, cfg.top_k)
        if "score" in ann:
            score = _as_float(ann["score"])
        if "decision" in ann:
            decision = None if ann["decision"] is None else str(ann["decision"])
        threshold = _as_float(ann["threshold"]) if "threshold" in ann else cfg.threshold
        if decision is None and score is not None and threshold is not None \
                and call.outcome == OUTCOME_OK and not math.isnan(score):
            decision = "positive" if score >= threshold else "negative"
        return outs, score, decision, threshold

    def classify_now(self, call: CapturedCall) -> RiskTier:
        """The call's risk tier, decided on the request path (only when the buffer is full).

        It sees what :meth:`finalize` would: outputs, the caller (annotation, JWT, hook or
        header) and the request attributes, so every rule applies on this path too."""
        try:
            view = self._view(call)
            _, score, decision, threshold = self.outputs(call, view.result)
            caller = self._caller(call, view)
        except Exception:  # noqa: BLE001 - classify as strictly as possible instead
            return self.sampler.policy.strictest_tier
        model = call_models(call.annotations, call.model)[0]
        return self.sampler.policy.classify(decision, score, threshold, model.name, caller,
                                            call.outcome, _attributes(call))

    def finalize(self, calls: Sequence[CapturedCall],
                 pause: Callable[[], None] = _no_pause) -> Finalized:
        """Classify and sample the calls; build one RecordBatch of the kept ones, in capture order.

        ``pause`` is called between small steps (a call, a slice of HMACs, a column): the
        flusher passes one that gives the GIL back to the replica's event loop every fraction of
        a millisecond (:class:`~serve_journal._private.batching.GilPacer`).
        """
        ident = self.identity
        n = len(calls)
        subjects: list[str | None] = []
        encoded: list[bytes | None] = []
        callers: list[str] = []
        outputs_col: list[Any] = []
        scores: list[float | None] = []
        decisions: list[str | None] = []
        thresholds: list[float | None] = []
        explanations: list[str | None] = []
        chosen: list[tuple[ModelInfo, list[tuple[ModelInfo, str]] | None]] = []
        for call in calls:
            pause()
            ann = call.annotations or {}
            chosen.append(call_models(call.annotations, call.model))
            try:
                view = self._view(call)
                caller = self._caller(call, view)
                subject = self._subject(call, view)
                features = self._features(call, view)
            except Exception as exc:  # noqa: BLE001 - a broken hook must not lose the entry
                logger.warning("serve_journal: extractor hook raised %s; entry kept without "
                               "subject/features", type(exc).__name__)
                view = CallView((), {}, None, {}, None)
                caller, subject, features = "anonymous", None, None
            callers.append(caller)
            subjects.append(subject)
            try:
                encoded.append(None if features is None else canonical_encode_fast(features))
            except CanonicalEncodingError:
                self.unencodable_features += 1
                encoded.append(None)
            outs, score, decision, threshold = self.outputs(call, view.result)
            outputs_col.append(outs)
            scores.append(score)
            decisions.append(decision)
            thresholds.append(threshold)
            ref = ann.get("explanation_ref")
            explanations.append(None if ref is None else str(ref))

        models: list[ModelInfo] = [deciding for deciding, _ in chosen]
        request_ids = [c.request_id for c in calls]
        outcomes = [c.outcome for c in calls]
        tiers: list[RiskTier] = []
        keep: list[bool] = []
        for lo in range(0, n, SLICE):  # classification and sampling HMACs, a slice at a time
            hi = lo + SLICE
            part = calls[lo:hi]
            assignment = self.sampler.assign(
                request_ids[lo:hi], decisions[lo:hi], scores[lo:hi], thresholds[lo:hi],
                [m.name for m in models[lo:hi]], callers[lo:hi], outcomes[lo:hi],
                attributes=[_attributes(c) for c in part], tiers=[c.tier for c in part],
            )
            tiers += assignment.tiers
            keep += assignment.keep
            pause()
        kept = [i for i in range(n) if keep[i]]
        traces = [trace_ids(calls[i].span, calls[i].scope) for i in kept]
        tier_names = [tier.name for tier in tiers]
        rates = [tier.sample_rate for tier in tiers]
        k = len(kept)
        protected: list[Any] = []
        recorded_callers: list[str] = []
        for lo in range(0, k, SLICE):  # feature HMACs and tokens, a slice at a time
            part_kept = kept[lo:lo + SLICE]
            protected += self.pseudonymizer.protect([subjects[i] for i in part_kept],
                                                    [encoded[i] for i in part_kept])
            part_callers = [callers[i] for i in part_kept]
            if self.caller_tokenizer is not None:
                part_callers = self.caller_tokenizer.tokenize_many(part_callers)
            recorded_callers += part_callers
            pause()

        def col(values: list, typ: pa.DataType) -> pa.Array:
            return pa.array([values[i] for i in kept], typ)

        builders: dict[str, Callable[[], pa.Array]] = {
            "schema_version": lambda: pa.array([SCHEMA_VERSION] * k, pa.int16()),
            "request_id": lambda: col(request_ids, pa.string()),
            "ts": lambda: pa.array([calls[i].ts_us for i in kept], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")),
            "caller": lambda: pa.array(recorded_callers, pa.string()),
            "subject_token": lambda: pa.array([p.subject_token for p in protected], pa.string()),
            "model_name": lambda: pa.array([models[i].name for i in kept], pa.string()),
            "model_version": lambda: pa.array([models[i].version for i in kept], pa.string()),
            "dataset_hash": lambda: pa.array([models[i].dataset_hash for i in kept], pa.string()),
            "dataset_hash_source": lambda: pa.array([models[i].dataset_hash_source for i in kept],
                                                    pa.string()),
            "features_hmac": lambda: pa.array([p.features_hmac for p in protected], pa.string()),
            "key_id": lambda: pa.array([p.key_id for p in protected], pa.string()),
            "outputs": lambda: col(outputs_col, ENTRY_SCHEMA.field("outputs").type),
            "score": lambda: col(scores, pa.float64()),
            "threshold": lambda: col(thresholds, pa.float64()),
            "decision": lambda: col(decisions, pa.string()),
            "explanation_ref": lambda: col(explanations, pa.string()),
            "outcome": lambda: col(outcomes, pa.string()),
            "error_type": lambda: pa.array([calls[i].error_type for i in kept], pa.string()),
            "latency_ms": lambda: pa.array([calls[i].latency_ms for i in kept], pa.float32()),
            "risk_tier": lambda: col(tier_names, pa.string()),
            "sample_rate": lambda: col(rates, pa.float32()),
            "producer_id": lambda: pa.array([ident.producer_id] * k, pa.string()),
            "seq": lambda: pa.array([calls[i].seq for i in kept], pa.int64()),
            "app_name": lambda: pa.array([ident.app_name] * k, pa.string()),
            "deployment": lambda: pa.array([ident.deployment] * k, pa.string()),
            "replica": lambda: pa.array([ident.replica] * k, pa.string()),
            "model_run_id": lambda: pa.array([models[i].run_id for i in kept], pa.string()),
            "model_digest": lambda: pa.array([models[i].digest for i in kept], pa.string()),
            "models": lambda: pa.array([_models_cell(chosen[i][1]) for i in kept],
                                       ENTRY_SCHEMA.field("models").type),
            "trace_id": lambda: pa.array([t[0] for t in traces], pa.string()),
            "span_id": lambda: pa.array([t[1] for t in traces], pa.string()),
        }
        columns = {}
        for name, build in builders.items():  # Arrow columns, built once per batch, one at a time
            columns[name] = build()
            pause()
        batch = pa.RecordBatch.from_arrays([columns[f.name] for f in ENTRY_SCHEMA], schema=ENTRY_SCHEMA)
        return Finalized(batch=batch, models=models, decisions=decisions, tiers=tier_names,
                         rates=rates, outcomes=outcomes, keep=keep)
