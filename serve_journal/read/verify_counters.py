"""Verify's check of the exact counters: only signed, chained counters explain a sequence gap.

A replica writes its counters files (``_counters/``) signed by its counters key and chained per
producer (:mod:`serve_journal.counters`); the journal's manifest key certifies that key
(:mod:`serve_journal.integrity.certificates`). Here:

- a certificate the auditor's key did not sign is an error (``key-certificate-invalid``);
- a counters file not signed by a certified key (forged, edited, renamed, copied) is an error
  (``counters-unsigned``) and explains nothing;
- within a producer's chain, a file whose predecessor is missing (``counters-chain-broken``, the
  missing file named) or two files claiming one predecessor (``counters-chain-forked``) are
  errors;
- each producer's chain head is remembered with the manifest chains' heads
  (``counters/<producer>``); a head an earlier run saw that is gone now is an error
  (``counters-rolled-back``: the newest counters file deleted);
- each producer's signed sequence lease (:func:`serve_journal.counters.producer_leases`) bounds
  what it may have answered. :func:`lease_findings`: a producer that never closed and wrote no
  counters file for :data:`~serve_journal.counters.PRODUCER_STALE_S` died; the sequence numbers
  past everything the journal's rows and signed gaps account for, up to its lease, are an error
  (``producer-died``, "up to N entries lost"). An error, not a warning: those calls may have been
  answered, and verify OK must mean every answered call's entry is in the journal or its absence
  is a counted drop the tier allowed; a death is neither (it is also no tampering, and the
  finding says so). A closed producer's sequence numbers up to its last one must all be
  accounted for (``sequence-gap``). A live producer's in-flight range is no finding.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog.layout import PARQUET_SUFFIX, escape_value
from serve_journal.counters import (
    CLOSED,
    COUNTERS_DIR,
    DEAD,
    KIND_GAP,
    PRODUCER_STALE_S,
    CountersFile,
    ProducerLease,
    gap_reason,
    lease_shortfall,
    merge_runs,
    producer_leases,
    read_counters_file,
)
from serve_journal.integrity.certificates import (
    PURPOSE_COUNTERS,
    certificate_path,
    certified_keys,
)
from serve_journal.integrity.manifest import GENESIS_HASH, SeqRuns
from serve_journal.storage import JournalStorage

HEADS_PREFIX = "counters/"
"""Key prefix of counters chains in ``VerifyReport.heads``."""

AccountedGaps = dict[str, list[tuple[int, int, str]]]


@dataclass
class CountersCheck:
    """What the counters check found: the gaps signed counters explain, problems, chain heads."""

    gaps: AccountedGaps = field(default_factory=dict)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    """``(kind, path, detail)``, all errors."""
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, ProducerLease] = field(default_factory=dict)
    """Every leasing producer's signed lease (see :func:`lease_findings`)."""
    lease_paths: dict[str, str] = field(default_factory=dict)
    """The newest counters file of each leasing producer (where a finding points)."""


def check_counters(storage: JournalStorage, public_key: Ed25519PublicKey, model: str | None = None,
                   expected_heads: Mapping[str, Mapping[str, Any]] | None = None) -> CountersCheck:
    """Check every counters file (of ``model``, if given) against the counters keys
    ``public_key`` certified; chains and heads are checked on whole-journal runs only."""
    out = CountersCheck()
    keys, bad = certified_keys(storage, public_key, PURPOSE_COUNTERS)
    for path in bad:
        out.problems.append(("key-certificate-invalid", path, (
            "a counters key certificate the journal's key did not sign (forged or altered): "
            "counters signed by that key explain nothing")))
    prefix = f"{COUNTERS_DIR}/model={escape_value(model)}/" if model else f"{COUNTERS_DIR}/"
    valid: list[CountersFile] = []
    for path in storage.list_files(prefix, PARQUET_SUFFIX):
        try:
            counters = read_counters_file(path, storage.read(path))
        except (ValueError, OSError) as exc:
            out.problems.append(("counters-unreadable", path,
                                 f"not a counters file ({type(exc).__name__})"))
            continue
        if counters.verify(keys):
            valid.append(counters)
            continue
        why = "its counts and gaps explain nothing"
        if counters.key_id and counters.key_id not in keys:
            why = (f"no valid certificate for its key at "
                   f"{certificate_path(PURPOSE_COUNTERS, counters.key_id)}: {why}")
        out.problems.append(("counters-unsigned", path, (
            f"not signed by a certified counters key for this path (forged, altered, renamed or "
            f"copied, or its key's certificate is gone); {why}")))
    if model is None:
        _check_chains(valid, expected_heads or {}, out)
    if valid:
        out.leases = producer_leases(pa.concat_tables([f.table for f in valid]))
        newest: dict[str, tuple[int, str]] = {}
        for counters in valid:
            for row in counters.lease_rows():
                at = row["minute"]
                at_us = int(at.timestamp() * 1_000_000) if at is not None else 0
                if at_us >= newest.get(row["producer_id"], (-1, ""))[0]:
                    newest[row["producer_id"]] = (at_us, counters.path)
        out.lease_paths = {p: path for p, (_, path) in newest.items()}
    grouped: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for counters in valid:
        table = counters.table
        for producer, disposition, reason, kind, lo, hi in zip(
                table["producer_id"].to_pylist(), table["disposition"].to_pylist(),
                table["reason"].to_pylist(), table["kind"].to_pylist(),
                table["seq_lo"].to_pylist(), table["seq_hi"].to_pylist(), strict=True):
            if kind == KIND_GAP:
                grouped.setdefault(producer, {}).setdefault(
                    gap_reason(disposition, reason), []).append((lo, hi))
    for producer, by_reason in grouped.items():
        out.gaps[producer] = sorted(
            (lo, hi, why) for why, runs in by_reason.items() for lo, hi in merge_runs(runs))
    return out


def _check_chains(valid: list[CountersFile], expected: Mapping[str, Mapping[str, Any]],
                  out: CountersCheck) -> None:
    by_producer: dict[str, list[CountersFile]] = {}
    for counters in valid:
        by_producer.setdefault(counters.producer_id or "", []).append(counters)
    for producer, files in sorted(by_producer.items()):
        digests = {f.digest: f for f in files}
        successors: dict[str, list[CountersFile]] = {}
        for f in files:
            successors.setdefault(f.prev, []).append(f)
            if f.prev != GENESIS_HASH and f.prev not in digests:
                out.problems.append(("counters-chain-broken", f.path, (
                    f"producer {producer}: the counters file before this one, "
                    f"{f.prev_path or '(unnamed)'} (signed digest {f.prev[:16]}...), is missing "
                    "or does not verify")))
        for _prev, forks in sorted(successors.items()):
            if len(forks) > 1:
                out.problems.append(("counters-chain-forked", forks[1].path, (
                    f"producer {producer}: {len(forks)} counters files follow one predecessor "
                    f"({', '.join(f.path for f in forks)})")))
        heads = [f for f in files if f.digest not in successors]
        if len(heads) == 1:
            head = heads[0]
            out.heads[f"{HEADS_PREFIX}{producer}"] = {
                "length": len(files), "head_hash": head.digest, "path": head.path}
    for name, head in sorted(expected.items()):
        if not name.startswith(HEADS_PREFIX):
            continue
        producer = name[len(HEADS_PREFIX):]
        remembered = str(head.get("head_hash", ""))
        files = by_producer.get(producer, [])
        if not any(f.digest == remembered for f in files):
            path = str(head.get("path") or f"{COUNTERS_DIR}/")
            out.problems.append(("counters-rolled-back", path, (
                f"producer {producer}: an earlier verify saw this counters file signed at the "
                "head of the producer's chain; it is gone or no longer verifies")))


def lease_findings(check: CountersCheck, seq_ranges: Iterable[Mapping[str, Sequence[Sequence[int]]]],
                   now: dt.datetime | None = None, stale_s: float = PRODUCER_STALE_S,
                   ) -> list[tuple[str, str, str]]:
    """``(kind, path, detail)`` errors for producers whose lease outruns what is accounted for:
    a dead producer's unaccounted tail up to its lease (``producer-died``), a closed producer's
    unaccounted tail up to its last sequence number (``sequence-gap``). ``seq_ranges``: the
    per-producer sequence ranges of the data files' records; gaps inside those ranges are
    :func:`serve_journal.read.verify` ``sequence-gap`` findings already."""
    now_us = int((now or dt.datetime.now(dt.UTC)).timestamp() * 1_000_000)
    # Only the tail after the highest sequence number in the journal is the lease's to explain
    # (``start`` below), so of the files' runs only each producer's highest end counts.
    top: dict[str, int] = {}
    for ranges in seq_ranges:
        for producer, runs in ranges.items():
            high = runs.max_hi if isinstance(runs, SeqRuns) else max(
                (int(hi) for _, hi in runs), default=None)
            if high is not None:
                top[producer] = max(top.get(producer, high), high)
    rows = {producer: [(high, high)] for producer, high in top.items()}
    out = []
    for producer, lease in sorted(check.leases.items()):
        accounted = rows.get(producer, []) + [(lo, hi) for lo, hi, _ in check.gaps.get(producer, [])]
        start = max((hi for _, hi in accounted), default=-1) + 1
        short = lease_shortfall(lease, accounted, start, now_us, stale_s)
        if short is None or not short.count:
            continue
        path = check.lease_paths.get(producer, f"{COUNTERS_DIR}/")
        lo, hi = short.missing[0][0], short.missing[-1][1]
        if short.state == DEAD:
            silent = dt.datetime.fromtimestamp(lease.written_us / 1e6, dt.UTC).isoformat(
                timespec="seconds")
            out.append(("producer-died", path, (
                f"producer {producer}: never closed and silent since {silent} (over {stale_s:g} "
                f"s): presumed dead; sequence {lo}..{hi} is within its signed lease but neither "
                f"in the journal nor counted: up to {short.count} entries lost with its death "
                "(calls it may have answered; not a sign of tampering)")))
        elif short.state == CLOSED:
            out.append(("sequence-gap", path, (
                f"producer {producer}: closed cleanly at sequence {short.bound}, but {lo}..{hi} "
                f"({short.count} entries) is neither in the journal nor counted: loss")))
    return out
