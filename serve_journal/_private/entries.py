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
import operator
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


def _parse_bodies(bodies: list[Any]) -> list[Any]:
    """``[_json_or_none(b) for b in bodies]``, with the long-number scan done once for the
    batch: when no body holds a run of 19 digits (the common case), every bytes body goes
    straight to orjson, and only a body orjson refuses takes the general path."""
    if _LONG_NUMBER.search(b"\n".join(b for b in bodies if type(b) is bytes)) is not None:
        return [_json_or_none(b) for b in bodies]  # some body holds a long number
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    out = []
    append = out.append
    for body in bodies:
        if type(body) is not bytes or not body:  # none, empty, or another kind of buffer
            append(_json_or_none(body))
            continue
        try:
            append(loads(body))
        except decode_error:
            append(_json_or_none(body))
    return out


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


_UNPARSED = object()
"""A request body :meth:`EntryFinalizer._view` must parse itself."""

SLICE = 128
"""Calls classified, sampled or HMACed between two pauses of :meth:`EntryFinalizer.finalize`."""


def _no_pause() -> None:
    return None


_NO_ANNOTATIONS: Mapping[str, Any] = {}


def _taker(kept: list[int], n: int) -> Callable[[list], list]:
    """``values -> [values[i] for i in kept]`` for lists of length ``n``, without a Python loop."""
    if len(kept) == n:
        return list
    if not kept:
        return lambda values: []
    if len(kept) == 1:
        only = kept[0]
        return lambda values: [values[only]]
    pick = operator.itemgetter(*kept)
    return lambda values: list(pick(values))


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

    def _view(self, call: CapturedCall, parsed: Any = _UNPARSED) -> CallView:
        if call.scope is not None:
            body = _json_or_none(call.body) if parsed is _UNPARSED else parsed
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
        parsed: list[Any] = [_UNPARSED] * n
        view_of, caller_of, subject_of, features_of = (self._view, self._caller, self._subject,
                                                       self._features)
        outputs_of = self.outputs
        encode = canonical_encode_fast
        for at, call in enumerate(calls):
            if at % SLICE == 0:  # request bodies, a slice at a time, just before its calls
                http = [i for i in range(at, min(at + SLICE, n)) if calls[i].scope is not None]
                for i, parsed_body in zip(http, _parse_bodies([calls[i].body for i in http]),
                                          strict=True):
                    parsed[i] = parsed_body
            pause()
            body = parsed[at]
            ann = call.annotations or _NO_ANNOTATIONS
            chosen.append(call_models(call.annotations, call.model))
            try:
                view = view_of(call, body)
                caller = caller_of(call, view)
                subject = subject_of(call, view)
                features = features_of(call, view)
            except Exception as exc:  # noqa: BLE001 - a broken hook must not lose the entry
                logger.warning("serve_journal: extractor hook raised %s; entry kept without "
                               "subject/features", type(exc).__name__)
                view = CallView((), {}, None, {}, None)
                caller, subject, features = "anonymous", None, None
            callers.append(caller)
            subjects.append(subject)
            try:
                encoded.append(None if features is None else encode(features))
            except CanonicalEncodingError:
                self.unencodable_features += 1
                encoded.append(None)
            outs, score, decision, threshold = outputs_of(call, view.result)
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
        take = _taker(kept, n)
        kept_calls = take(calls)
        kept_models = take(models)
        traces = [trace_ids(c.span, c.scope) for c in kept_calls]
        tier_names = [tier.name for tier in tiers]
        rates = [tier.sample_rate for tier in tiers]
        k = len(kept)
        kept_subjects = take(subjects)
        kept_encoded = take(encoded)
        kept_callers = take(callers)
        tokens: list[str | None] = []
        digests: list[str | None] = []
        key_ids: list[str] = []
        recorded_callers: list[str] = []
        protect_columns = getattr(self.pseudonymizer, "protect_columns", None)
        for lo in range(0, k, SLICE):  # feature HMACs and tokens, a slice at a time
            hi = lo + SLICE
            if protect_columns is not None:
                part_tokens, part_digests, key_id = protect_columns(kept_subjects[lo:hi],
                                                                    kept_encoded[lo:hi])
                tokens += part_tokens
                digests += part_digests
                key_ids += [key_id] * len(part_tokens)
            else:  # any other Pseudonymizer: its per-entry protocol
                for p in self.pseudonymizer.protect(kept_subjects[lo:hi], kept_encoded[lo:hi]):
                    tokens.append(p.subject_token)
                    digests.append(p.features_hmac)
                    key_ids.append(p.key_id)
            part_callers = kept_callers[lo:hi]
            if self.caller_tokenizer is not None:
                part_callers = self.caller_tokenizer.tokenize_many(part_callers)
            recorded_callers += part_callers
            pause()

        string, float64 = pa.string(), pa.float64()
        builders: dict[str, Callable[[], pa.Array]] = {
            "schema_version": lambda: pa.array([SCHEMA_VERSION] * k, pa.int16()),
            "request_id": lambda: pa.array(take(request_ids), string),
            "ts": lambda: pa.array([c.ts_us for c in kept_calls], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")),
            "caller": lambda: pa.array(recorded_callers, string),
            "subject_token": lambda: pa.array(tokens, string),
            "model_name": lambda: pa.array([m.name for m in kept_models], string),
            "model_version": lambda: pa.array([m.version for m in kept_models], string),
            "dataset_hash": lambda: pa.array([m.dataset_hash for m in kept_models], string),
            "dataset_hash_source": lambda: pa.array([m.dataset_hash_source for m in kept_models],
                                                    string),
            "features_hmac": lambda: pa.array(digests, string),
            "key_id": lambda: pa.array(key_ids, string),
            "outputs": lambda: pa.array(take(outputs_col), ENTRY_SCHEMA.field("outputs").type),
            "score": lambda: pa.array(take(scores), float64),
            "threshold": lambda: pa.array(take(thresholds), float64),
            "decision": lambda: pa.array(take(decisions), string),
            "explanation_ref": lambda: pa.array(take(explanations), string),
            "outcome": lambda: pa.array(take(outcomes), string),
            "error_type": lambda: pa.array([c.error_type for c in kept_calls], string),
            "latency_ms": lambda: pa.array([c.latency_ms for c in kept_calls], pa.float32()),
            "risk_tier": lambda: pa.array(take(tier_names), string),
            "sample_rate": lambda: pa.array(take(rates), pa.float32()),
            "producer_id": lambda: pa.array([ident.producer_id] * k, string),
            "seq": lambda: pa.array([c.seq for c in kept_calls], pa.int64()),
            "app_name": lambda: pa.array([ident.app_name] * k, string),
            "deployment": lambda: pa.array([ident.deployment] * k, string),
            "replica": lambda: pa.array([ident.replica] * k, string),
            "model_run_id": lambda: pa.array([m.run_id for m in kept_models], string),
            "model_digest": lambda: pa.array([m.digest for m in kept_models], string),
            "models": lambda: pa.array([_models_cell(used) for _, used in take(chosen)],
                                       ENTRY_SCHEMA.field("models").type),
            "trace_id": lambda: pa.array([t[0] for t in traces], string),
            "span_id": lambda: pa.array([t[1] for t in traces], string),
        }
        columns = {}
        for name, build in builders.items():  # Arrow columns, built once per batch, one at a time
            columns[name] = build()
            pause()
        batch = pa.RecordBatch.from_arrays([columns[f.name] for f in ENTRY_SCHEMA], schema=ENTRY_SCHEMA)
        return Finalized(batch=batch, models=models, decisions=decisions, tiers=tier_names,
                         rates=rates, outcomes=outcomes, keep=keep)
