"""The replay report: counts by status, the model artifacts re-scoring used, and its summary.

:class:`ReplayReport` is what :func:`serve_journal.replay.replay` returns and
``serve-journal replay`` prints (a table, or ``--json``); :class:`ArtifactTally` counts the
per-entry results (:data:`~serve_journal.replay.tasks.RESULT_SCHEMA`) into it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.replay.statuses import (
    ARTIFACT_DIFFERS,
    ARTIFACT_DIGEST_DIFFERS,
    ARTIFACT_MLMODEL_ONLY,
    ARTIFACT_NOT_CHECKED,
    ARTIFACT_NOT_PINNED,
    ARTIFACT_PINNED,
    ARTIFACT_RUN_ID_DIFFERS,
    ARTIFACT_RUN_ID_ONLY,
    STATUSES,
    VERIFIED,
)

__all__ = ["ArtifactMismatch", "ArtifactTally", "ReplayReport"]

_ARTIFACT_LINES = (
    (ARTIFACT_PINNED, "re-scored with the checked artifact (run id and sha256 digest match)"),
    (ARTIFACT_RUN_ID_ONLY, "re-scored after a run id check only (no digest journaled)"),
    (ARTIFACT_MLMODEL_ONLY, "re-scored after an MLmodel check (mlmodel-sha256: the weights are "
                            "not pinned, loaded by version)"),
    (ARTIFACT_NOT_PINNED, "artifact not pinned (no run id or digest: schema v1 or unknown), "
                          "re-scored by version"),
    (ARTIFACT_NOT_CHECKED, "artifact not checked (the rescorer has no check), re-scored by "
                           "version"),
)
"""The summary's line per artifact status of a re-scored entry."""

_DIFFERS = {ARTIFACT_RUN_ID_DIFFERS: "run id differs", ARTIFACT_DIGEST_DIFFERS: "digest differs",
            ARTIFACT_DIFFERS: "artifact differs"}


@dataclass(frozen=True)
class ArtifactMismatch:
    """One journaled artifact the registry no longer holds (``artifact_mismatch`` entries)."""

    model: str
    """``models:/<name>/<version>``."""
    differs: str
    """The entries' ``artifact_status``: ``run_id_differs``, ``digest_differs`` or ``differs``."""
    reason: str
    """What differs, naming run ids or digests (never a feature value)."""
    entries: int


@dataclass(frozen=True)
class ReplayReport:
    """What a replay found."""

    journal_uri: str
    model: str
    total: int
    counts: dict[str, int]
    rescored: bool
    files: int
    elapsed_s: float
    output: str | None = None
    subjects_requested: int | None = None
    """How many subject ids were given (``None``: every entity of the feature store)."""
    subjects_without_key: int = 0
    """Given subjects with no live key (never seen, or forgotten): their entries cannot be found."""
    results: pa.Table | None = dataclasses.field(default=None, repr=False, compare=False)
    """Per-entry results (:data:`RESULT_SCHEMA`) when kept in memory."""
    artifacts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Re-scored entries by ``artifact_status`` (which artifact they were scored with, or what
    differed)."""
    artifact_mismatches: tuple[ArtifactMismatch, ...] = ()
    """Every journaled artifact the registry no longer holds, with what differs."""
    several_models: int = 0
    """Re-scored entries that list several models: re-scored with the deciding one only."""

    @property
    def ok(self) -> bool:
        """True when every selected entry verified."""
        return self.counts.get(VERIFIED, 0) == self.total

    @property
    def exit_code(self) -> int:
        """0 when everything verified, 1 otherwise (the CLI's exit code)."""
        return 0 if self.ok else 1

    @property
    def entries_per_s(self) -> float:
        """Throughput of the whole run (entries per wall-clock second)."""
        return self.total / self.elapsed_s if self.elapsed_s > 0 else math.inf

    def format_summary(self) -> str:
        """The summary table the CLI prints."""
        lines = [f"replay of model {self.model!r} in {self.journal_uri}"
                 f"{' (with rescore)' if self.rescored else ''}",
                 f"{self.total} entries from {self.files} files in {self.elapsed_s:.1f} s "
                 f"({self.entries_per_s:,.0f} entries/s)", "",
                 f"{'status':<20}{'entries':>12}{'share':>9}", "-" * 41]
        for status in (*STATUSES, *sorted(set(self.counts) - set(STATUSES))):
            count = self.counts.get(status, 0)
            if count or status == VERIFIED:
                share = count / self.total if self.total else 0.0
                lines.append(f"{status:<20}{count:>12,}{share:>9.1%}")
        lines.append("-" * 41)
        for status, text in _ARTIFACT_LINES:
            if self.artifacts.get(status):
                lines.append(f"{self.artifacts[status]:,} entries: {text}")
        if self.several_models:
            lines.append(f"{self.several_models:,} entries of calls with several models: "
                         "re-scored with the deciding model only")
        for mismatch in self.artifact_mismatches:
            lines.append(f"ARTIFACT MISMATCH {mismatch.model} ({_DIFFERS[mismatch.differs]}, "
                         f"{mismatch.entries:,} entries not re-scored): {mismatch.reason}")
        if self.subjects_without_key:
            lines.append(f"{self.subjects_without_key} of {self.subjects_requested} given subjects "
                         "have no live key (never seen or forgotten)")
        if self.total == 0:
            lines.append("no journal entries matched the selection")
        lines.append("result: " + ("all entries verified" if self.ok else "NOT everything verified"))
        if self.output:
            lines.append(f"per-entry results: {self.output}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (``serve-journal replay --json``); no per-entry rows."""
        return {
            "journal": self.journal_uri, "model": self.model, "rescored": self.rescored,
            "total": self.total, "files": self.files, "counts": dict(self.counts),
            "artifacts": dict(self.artifacts), "several_models": self.several_models,
            "artifact_mismatches": [dataclasses.asdict(m) for m in self.artifact_mismatches],
            "subjects_requested": self.subjects_requested,
            "subjects_without_key": self.subjects_without_key,
            "ok": self.ok, "exit_code": self.exit_code, "output": self.output,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class ArtifactTally:
    """Artifact statuses, several-model entries and mismatched artifacts over result batches."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.several = 0
        self._mismatched: dict[tuple[str, str, str, str], int] = {}

    def add(self, out: pa.Table) -> None:
        """Count one batch of :data:`RESULT_SCHEMA` rows."""
        for item in pc.value_counts(out["artifact_status"].drop_null()).to_pylist():
            self.counts[item["values"]] = self.counts.get(item["values"], 0) + item["counts"]
        self.several += int(pc.sum(pc.cast(out["several_models"].fill_null(False),
                                           pa.int64())).as_py() or 0)
        failed = out.filter(pc.is_valid(out["artifact_reason"]))
        for row in failed.select(["model_name", "model_version", "artifact_status",
                                  "artifact_reason"]).to_pylist():
            key = (row["model_name"], row["model_version"], row["artifact_status"],
                   row["artifact_reason"])
            self._mismatched[key] = self._mismatched.get(key, 0) + 1

    def mismatches(self) -> tuple[ArtifactMismatch, ...]:
        """One :class:`ArtifactMismatch` per (version, what differs), sorted."""
        return tuple(ArtifactMismatch(f"models:/{name}/{version}", differs, reason, n)
                     for (name, version, differs, reason), n in sorted(self._mismatched.items()))
