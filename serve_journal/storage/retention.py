"""Named retention policies: how long journal objects stay write-once, and under which lock mode.

Retention is configuration, not a number in the code. The operator names the rule that governs
their records; the built-ins carry the periods their rules state:

* ``"SEC 17a-4"``: six years, Object Lock COMPLIANCE. SEC Rule 17a-4(a) keeps certain
  broker-dealer records six years (17a-4(b) others three); 17a-4(f) sets the non-rewriteable,
  non-erasable (WORM) electronic storage requirement that S3 Object Lock in compliance mode is used
  for.
* ``"FINRA 4511"``: six years, COMPLIANCE. FINRA Rule 4511(b) keeps records for which no other
  period is specified six years, in a format complying with SEA Rule 17a-4.
* ``custom``: any number of days and/or years, in COMPLIANCE or GOVERNANCE mode.

The problem statement's "7 years per SR 11-7" is not in the text of SR 11-7 (the Federal Reserve /
OCC guidance on model risk management sets no retention period); which rule governs, and so the
period, is the operator's choice. See docs/tamper-evidence.md.

Hot and cold tiers can carry different policies (:class:`TieredRetention`); manifests and
checkpoints are kept at least as long as the longest tier policy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serve_journal.errors import RetentionError

COMPLIANCE = "COMPLIANCE"
GOVERNANCE = "GOVERNANCE"
LOCK_MODES = (COMPLIANCE, GOVERNANCE)


@dataclass(frozen=True)
class RetentionPolicy:
    """A named retention rule: keep objects write-once for ``years`` + ``days`` after creation."""

    name: str
    years: int = 0
    days: int = 0
    mode: str = COMPLIANCE
    """S3 Object Lock mode: ``COMPLIANCE`` (nobody, not even the root account, can shorten it) or
    ``GOVERNANCE`` (principals with ``s3:BypassGovernanceRetention`` can)."""
    reference: str = ""
    """Where the period comes from, for the audit report."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise RetentionError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("years", "days"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RetentionError(f"{field} must be a non-negative integer, got {value!r}")
        if self.years == 0 and self.days == 0:
            raise RetentionError("a retention policy needs years > 0 or days > 0")
        if self.mode not in LOCK_MODES:
            raise RetentionError(f"mode must be one of {LOCK_MODES}, got {self.mode!r}")

    @classmethod
    def custom(
        cls, *, years: int = 0, days: int = 0, mode: str = COMPLIANCE, name: str = "custom",
        reference: str = "",
    ) -> RetentionPolicy:
        """A policy the operator defines (``name`` defaults to ``"custom"``)."""
        return cls(name=name, years=years, days=days, mode=mode, reference=reference)

    def retain_until(self, created: dt.datetime) -> dt.datetime:
        """The instant (UTC) until which an object created at ``created`` must stay unchanged.

        Years are calendar years; 29 February plus whole years lands on 1 March (never earlier).
        """
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.UTC)
        created = created.astimezone(dt.UTC)
        year = created.year + self.years
        try:
            until = created.replace(year=year)
        except ValueError:  # 29 February into a non-leap year
            until = created.replace(year=year, month=3, day=1)
        return until + dt.timedelta(days=self.days)

    def describe(self) -> str:
        """Human summary, e.g. ``SEC 17a-4: 6 years, COMPLIANCE``."""
        parts = []
        if self.years:
            parts.append(f"{self.years} year{'s' if self.years != 1 else ''}")
        if self.days:
            parts.append(f"{self.days} day{'s' if self.days != 1 else ''}")
        return f"{self.name}: {' + '.join(parts)}, {self.mode}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "years": self.years, "days": self.days, "mode": self.mode,
                "reference": self.reference}


SEC_17A_4 = RetentionPolicy(
    name="SEC 17a-4", years=6, mode=COMPLIANCE,
    reference="SEC Rule 17a-4(a) six-year records; 17a-4(f) WORM electronic storage",
)
FINRA_4511 = RetentionPolicy(
    name="FINRA 4511", years=6, mode=COMPLIANCE,
    reference="FINRA Rule 4511(b): six years where no other period is specified",
)

BUILTIN_POLICIES: dict[str, RetentionPolicy] = {
    "sec 17a-4": SEC_17A_4,
    "sec 17a-4(f)": SEC_17A_4,
    "finra 4511": FINRA_4511,
}


def policy(value: RetentionPolicy | str | Mapping[str, Any]) -> RetentionPolicy:
    """A policy from configuration: a policy, a built-in name, or a mapping.

    Mappings are ``{"name": "SEC 17a-4"}`` for a built-in or
    ``{"name": "custom", "years": 7, "mode": "GOVERNANCE"}`` (any name) for a custom rule.
    """
    if isinstance(value, RetentionPolicy):
        return value
    if isinstance(value, str):
        found = BUILTIN_POLICIES.get(value.strip().lower())
        if found is None:
            raise RetentionError(
                f"retention policy name must be one of {sorted({p.name for p in BUILTIN_POLICIES.values()})} "
                f"or a mapping with years/days, got {value!r}"
            )
        return found
    if isinstance(value, Mapping):
        known = {"name", "years", "days", "mode", "reference"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RetentionError(f"unknown retention field(s) {unknown}; known: {sorted(known)}")
        if "years" not in value and "days" not in value:
            return policy(str(value.get("name", "")))
        return RetentionPolicy(
            name=str(value.get("name", "custom")), years=value.get("years", 0),
            days=value.get("days", 0), mode=value.get("mode", COMPLIANCE),
            reference=str(value.get("reference", "")),
        )
    raise RetentionError(
        f"retention policy must be a RetentionPolicy, a name or a mapping, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class TieredRetention:
    """Policies per journal area: data tiers ``hot`` and ``cold``, and the manifests/checkpoints.

    ``None`` for a tier means its objects are not locked (e.g. a hot tier compacted into cold after
    a few days). ``manifest`` defaults to the longest tier policy: a record must outlive its file.
    """

    hot: RetentionPolicy | None = None
    cold: RetentionPolicy | None = None
    manifest: RetentionPolicy | None = None

    def __post_init__(self) -> None:
        if self.manifest is None:
            longest = max(
                (p for p in (self.hot, self.cold) if p is not None),
                key=lambda p: p.retain_until(dt.datetime(2000, 1, 1, tzinfo=dt.UTC)),
                default=None,
            )
            object.__setattr__(self, "manifest", longest)

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | RetentionPolicy | str | None) -> TieredRetention:
        """From ``{"hot": ..., "cold": ..., "manifest": ...}`` (each as :func:`policy` takes), or
        one policy (name, mapping) for every area."""
        if value is None:
            return cls()
        if isinstance(value, Mapping) and set(value) <= {"hot", "cold", "manifest"}:
            return cls(**{k: None if v is None else policy(v) for k, v in value.items()})
        one = policy(value)
        return cls(hot=one, cold=one, manifest=one)

    def for_path(self, relative: str) -> RetentionPolicy | None:
        """The policy of the object at journal path ``relative``."""
        area = relative.lstrip("/").split("/", 1)[0]
        if area == "hot":
            return self.hot
        if area == "cold":
            return self.cold
        return self.manifest
