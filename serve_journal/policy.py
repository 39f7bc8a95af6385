"""Risk tiers, rules and overflow behaviour (specified in docs/operations.md).

A :class:`RiskPolicy` is an ordered list of :class:`RiskRule` s; the first rule that matches an
entry names its :class:`RiskTier`, otherwise the policy's default tier applies. A tier says with
which probability its entries are kept (``sample_rate``) and what happens to a request of that
tier when the buffer or spool is full (``overflow``):

- ``"drop"``: the entry is dropped and counted with a reason (never for a high-risk tier);
- ``"wait"``: the request waits at most ``timeout_s`` for room, then ``on_timeout`` applies;
- ``"refuse"``: fail-closed, the request is refused (HTTP 503): the decision is not served
  unjournaled.

Sampling (:mod:`serve_journal.sampling`) is deterministic: an entry is kept iff ``HMAC-SHA256(key, request_id)``, read as a
uniform number ``u`` in [0, 1), is below the tier's rate. ``u`` is the first 8 bytes of the digest
as a big-endian integer, shifted right by 11 bits (53 bits) and divided by 2**53, so the keep
decision can be re-derived later in any language from the request id, the journal's
``sample_rate`` column and the key. Rates are rounded to float32 when a tier is built so that the
rate in force equals the one stored in the journal's float32 ``sample_rate`` column exactly.

This module imports no third-party package. Policies are frozen and picklable: validated on the
driver, shipped to replicas.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_journal.errors import ConfigError

OVERFLOW_DROP = "drop"
OVERFLOW_WAIT = "wait"
OVERFLOW_REFUSE = "refuse"
OVERFLOW_ACTIONS = (OVERFLOW_DROP, OVERFLOW_WAIT, OVERFLOW_REFUSE)
TIMEOUT_ACTIONS = (OVERFLOW_DROP, OVERFLOW_REFUSE)

HIGH = "high"
MEDIUM = "medium"
LOW = "low"

_TIER_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``value`` (0.1, not 0.10000000149)."""
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _float32(candidate) == value:
            return candidate
    return value


def _real(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:  # numpy scalars
            if hasattr(value, "dtype") and hasattr(value, "item"):
                value = value.item()
            else:
                return None
        except Exception:  # noqa: BLE001 - classification never raises
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- tiers


@dataclass(frozen=True)
class RiskTier:
    """A risk tier: how often its entries are kept and what happens when there is no room.

    ``high_risk`` defaults to ``True`` for a tier named ``"high"``; a high-risk tier must keep
    every entry (``sample_rate == 1.0``) and must never drop (``overflow`` is ``"wait"`` or
    ``"refuse"``, and a wait that times out refuses).
    """

    name: str
    sample_rate: float = 1.0
    overflow: str = OVERFLOW_DROP
    timeout_s: float = 0.0
    """Longest wait for room when ``overflow == "wait"`` (seconds)."""
    on_timeout: str | None = None
    """What a wait that timed out does: ``"drop"`` or ``"refuse"``; default refuse for high risk."""
    high_risk: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TIER_NAME.match(self.name):
            raise ConfigError(
                f"risk tier name must match {_TIER_NAME.pattern}, got {self.name!r}"
            )
        high = self.name == HIGH if self.high_risk is None else self.high_risk
        if not isinstance(high, bool):
            raise ConfigError(f"tier {self.name}: high_risk must be true or false, got {high!r}")
        object.__setattr__(self, "high_risk", high)
        rate = _real(self.sample_rate)
        if rate is None or not 0.0 <= rate <= 1.0:
            raise ConfigError(
                f"tier {self.name}: sample_rate must be a number in [0, 1], got {self.sample_rate!r}"
            )
        if high and rate != 1.0:
            raise ConfigError(
                f"tier {self.name} is high-risk: sample_rate must be 1.0 (keep every entry), "
                f"got {self.sample_rate!r}"
            )
        object.__setattr__(self, "sample_rate", _float32(rate))
        if self.overflow not in OVERFLOW_ACTIONS:
            raise ConfigError(
                f"tier {self.name}: overflow must be one of {OVERFLOW_ACTIONS}, got {self.overflow!r}"
            )
        if high and self.overflow == OVERFLOW_DROP:
            raise ConfigError(
                f"tier {self.name} is high-risk: overflow must be 'wait' or 'refuse' "
                "(fail-closed), not 'drop'"
            )
        timeout = _real(self.timeout_s)
        if timeout is None or timeout < 0:
            raise ConfigError(
                f"tier {self.name}: timeout_s must be a non-negative number of seconds, "
                f"got {self.timeout_s!r}"
            )
        if self.overflow == OVERFLOW_WAIT and timeout <= 0:
            raise ConfigError(
                f"tier {self.name}: overflow 'wait' needs timeout_s > 0 (a bounded wait), "
                f"got {self.timeout_s!r}"
            )
        object.__setattr__(self, "timeout_s", timeout)
        on_timeout = self.on_timeout
        if on_timeout is None:
            on_timeout = OVERFLOW_REFUSE if high else OVERFLOW_DROP
        if on_timeout not in TIMEOUT_ACTIONS:
            raise ConfigError(
                f"tier {self.name}: on_timeout must be one of {TIMEOUT_ACTIONS}, got {on_timeout!r}"
            )
        if high and on_timeout == OVERFLOW_DROP:
            raise ConfigError(
                f"tier {self.name} is high-risk: on_timeout must be 'refuse', not 'drop'"
            )
        object.__setattr__(self, "on_timeout", on_timeout)

    @property
    def weight(self) -> float:
        """Horvitz-Thompson weight ``1 / sample_rate`` of a kept entry (inf for rate 0)."""
        return math.inf if self.sample_rate == 0 else 1.0 / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form accepted by :meth:`from_dict`."""
        out: dict[str, Any] = {
            "sample_rate": _shortest_float32(self.sample_rate),
            "overflow": self.overflow,
            "high_risk": self.high_risk,
            "on_timeout": self.on_timeout,
        }
        if self.overflow == OVERFLOW_WAIT:
            out["timeout_s"] = self.timeout_s
        return out

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> RiskTier:
        """Build the tier ``name`` from ``{"sample_rate": .., "overflow": .., ...}``."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"tier {name}: expected a mapping of settings, got {type(spec).__name__}")
        known = {"sample_rate", "overflow", "timeout_s", "on_timeout", "high_risk"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"tier {name}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(name=name, **dict(spec))


# --------------------------------------------------------------------------- rules


def _value_set(field_name: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = list(value)
        if items and all(isinstance(item, str) for item in items):
            return frozenset(items)
    raise ConfigError(f"rule {field_name} must be a string or a non-empty list of strings")


@dataclass(frozen=True)
class RiskRule:
    """One rule: every condition given must hold for the rule to match; ``None`` means any.

    Conditions: ``decision``, ``model``, ``caller``, ``outcome`` (sets of allowed values),
    ``score_min <= score < score_max``, ``abs(score - threshold) < near_threshold`` and
    ``attributes`` (request attribute name -> allowed values). A score condition does not match an
    entry without a score; a threshold condition does not match an entry without a threshold.
    """

    tier: RiskTier
    decision: frozenset[str] | None = None
    score_min: float | None = None
    score_max: float | None = None
    near_threshold: float | None = None
    model: frozenset[str] | None = None
    caller: frozenset[str] | None = None
    outcome: frozenset[str] | None = None
    attributes: tuple[tuple[str, frozenset[str]], ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tier, RiskTier):
            raise ConfigError(f"rule tier must be a RiskTier, got {type(self.tier).__name__}")
        label = self.name or f"-> {self.tier.name}"
        for name in ("decision", "model", "caller", "outcome"):
            object.__setattr__(self, name, _value_set(f"{label}: {name}", getattr(self, name)))
        for name in ("score_min", "score_max", "near_threshold"):
            value = getattr(self, name)
            if value is not None and _real(value) is None:
                raise ConfigError(f"rule {label}: {name} must be a finite number, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, float(value))
        if (
            self.score_min is not None
            and self.score_max is not None
            and not self.score_min < self.score_max
        ):
            raise ConfigError(f"rule {label}: score_min must be below score_max")
        if self.near_threshold is not None and self.near_threshold <= 0:
            raise ConfigError(f"rule {label}: near_threshold must be > 0")
        attributes = self.attributes
        if isinstance(attributes, Mapping):
            attributes = tuple(attributes.items())
        frozen = []
        for key, allowed in attributes:
            if not isinstance(key, str):
                raise ConfigError(f"rule {label}: attribute names must be strings")
            values = _value_set(f"{label}: attributes.{key}", allowed)
            frozen.append((key, values))
        object.__setattr__(self, "attributes", tuple(sorted(frozen)))

    def matches(
        self,
        decision: str | None,
        score: float | None,
        threshold: float | None,
        model: str | None,
        caller: str | None,
        outcome: str | None,
        attributes: Mapping[str, Any] | None,
    ) -> bool:
        """Whether the entry described by the arguments satisfies every condition of this rule.

        ``score`` and ``threshold`` must already be finite floats or ``None``.
        """
        if self.decision is not None and decision not in self.decision:
            return False
        if self.model is not None and model not in self.model:
            return False
        if self.caller is not None and caller not in self.caller:
            return False
        if self.outcome is not None and outcome not in self.outcome:
            return False
        if self.score_min is not None and (score is None or score < self.score_min):
            return False
        if self.score_max is not None and (score is None or score >= self.score_max):
            return False
        if self.near_threshold is not None and (
            score is None or threshold is None or abs(score - threshold) >= self.near_threshold
        ):
            return False
        if self.attributes:
            if not attributes:
                return False
            for key, allowed in self.attributes:
                value = attributes.get(key)
                if not isinstance(value, str) or value not in allowed:
                    return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (the tier by name) accepted by :meth:`RiskPolicy.from_dict`."""
        out: dict[str, Any] = {"tier": self.tier.name}
        if self.name is not None:
            out["name"] = self.name
        for name in ("decision", "model", "caller", "outcome"):
            value = getattr(self, name)
            if value is not None:
                out[name] = sorted(value)
        for name in ("score_min", "score_max", "near_threshold"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.attributes:
            out["attributes"] = {key: sorted(values) for key, values in self.attributes}
        return out


# --------------------------------------------------------------------------- policy

_RULE_KEYS = frozenset(
    {"tier", "name", "decision", "score_min", "score_max", "near_threshold", "model", "caller",
     "outcome", "attributes"}
)


@dataclass(frozen=True)
class RiskPolicy:
    """Ordered rules, first match wins, else ``default_tier``. Frozen and picklable.

    Cost of :meth:`classify`: a loop over the rules with a few set look-ups and float comparisons
    each, about a microsecond for a handful of rules (measured in tests/test_policy.py), so the
    request path can afford it when the buffer is full and the overflow action is needed.
    """

    rules: tuple[RiskRule, ...]
    default_tier: RiskTier
    tiers: Mapping[str, RiskTier] = field(default_factory=dict, compare=False)
    """Every tier by name (filled in from the rules and the default tier)."""

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        if not isinstance(self.default_tier, RiskTier):
            raise ConfigError(
                f"default_tier must be a RiskTier, got {type(self.default_tier).__name__}"
            )
        tiers: dict[str, RiskTier] = {}
        for tier in [*dict(self.tiers).values(), *(rule.tier for rule in rules), self.default_tier]:
            known = tiers.setdefault(tier.name, tier)
            if known != tier:
                raise ConfigError(f"two different tiers are both named {tier.name!r}")
        for rule in rules:
            if not isinstance(rule, RiskRule):
                raise ConfigError(f"rules must be RiskRule objects, got {type(rule).__name__}")
        object.__setattr__(self, "tiers", dict(sorted(tiers.items())))

    # -- classification ---------------------------------------------------

    @property
    def strictest_tier(self) -> RiskTier:
        """The tier used when an entry cannot be classified: high-risk first, then highest rate."""
        order = {OVERFLOW_REFUSE: 0, OVERFLOW_WAIT: 1, OVERFLOW_DROP: 2}
        return min(
            self.tiers.values(),
            key=lambda t: (not t.high_risk, -t.sample_rate, order[t.overflow], t.name),
        )

    def classify(
        self,
        decision: str | None = None,
        score: Any = None,
        threshold: Any = None,
        model: str | None = None,
        caller: str | None = None,
        outcome: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> RiskTier:
        """The tier of one entry. Never raises: if classification fails (a broken attribute
        mapping, say) the :attr:`strictest_tier` is returned, so no high-risk entry is lost."""
        try:
            score_f = _real(score) if score is not None else None
            threshold_f = _real(threshold) if threshold is not None else None
            if attributes is not None and not isinstance(attributes, Mapping):
                attributes = None
            for rule in self.rules:
                if rule.matches(decision, score_f, threshold_f, model, caller, outcome, attributes):
                    return rule.tier
            return self.default_tier
        except Exception:  # noqa: BLE001 - the request path must never raise
            return self.strictest_tier

    def classify_many(
        self,
        decisions: Sequence[str | None],
        scores: Sequence[Any] | None = None,
        thresholds: Sequence[Any] | Any = None,
        models: Sequence[str | None] | str | None = None,
        callers: Sequence[str | None] | str | None = None,
        outcomes: Sequence[str | None] | str | None = None,
        attributes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[RiskTier]:
        """:meth:`classify` over columns (lists of equal length); a scalar applies to every row."""
        n = len(decisions)
        columns = [
            _column(scores, n, "scores"),
            _column(thresholds, n, "thresholds"),
            _column(models, n, "models"),
            _column(callers, n, "callers"),
            _column(outcomes, n, "outcomes"),
            _column(attributes, n, "attributes"),
        ]
        classify = self.classify
        return [
            classify(d, s, t, m, c, o, a)
            for d, s, t, m, c, o, a in zip(decisions, *columns, strict=True)
        ]

    def tier(self, name: str) -> RiskTier:
        """The tier called ``name``."""
        try:
            return self.tiers[name]
        except KeyError:
            raise KeyError(f"no risk tier {name!r}; tiers: {sorted(self.tiers)}") from None

    # -- configuration ----------------------------------------------------

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RiskPolicy:
        """Build a policy from plain data (the shape YAML or JSON gives)::

            tiers:
              high:   {sample_rate: 1.0, overflow: refuse}
              medium: {sample_rate: 1.0, overflow: wait, timeout_s: 0.05}
              low:    {sample_rate: 0.1, overflow: drop}
            rules:
              - {tier: high, decision: block}
              - {tier: medium, near_threshold: 0.1}
            default_tier: low
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"risk policy must be a mapping, got {type(config).__name__}")
        unknown = sorted(set(config) - {"tiers", "rules", "default_tier"})
        if unknown:
            raise ConfigError(
                f"risk policy: unknown key(s) {unknown}; known: ['default_tier', 'rules', 'tiers']"
            )
        tier_specs = config.get("tiers")
        if not isinstance(tier_specs, Mapping) or not tier_specs:
            raise ConfigError("risk policy: tiers must be a non-empty mapping of name -> settings")
        tiers = {name: RiskTier.from_dict(name, spec) for name, spec in tier_specs.items()}
        rules = []
        for i, spec in enumerate(config.get("rules") or ()):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"risk policy: rules[{i}] must be a mapping")
            unknown = sorted(set(spec) - _RULE_KEYS)
            if unknown:
                raise ConfigError(
                    f"risk policy: rules[{i}] has unknown key(s) {unknown}; known: {sorted(_RULE_KEYS)}"
                )
            tier_name = spec.get("tier")
            if tier_name not in tiers:
                raise ConfigError(
                    f"risk policy: rules[{i}].tier must name a tier {sorted(tiers)}, got {tier_name!r}"
                )
            rules.append(RiskRule(**{**dict(spec), "tier": tiers[tier_name]}))
        default_name = config.get("default_tier")
        if default_name not in tiers:
            raise ConfigError(
                f"risk policy: default_tier must name a tier {sorted(tiers)}, got {default_name!r}"
            )
        return cls(rules=tuple(rules), default_tier=tiers[default_name], tiers=tiers)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form; ``RiskPolicy.from_dict(p.to_dict()) == p``."""
        return {
            "tiers": {name: tier.to_dict() for name, tier in self.tiers.items()},
            "rules": [rule.to_dict() for rule in self.rules],
            "default_tier": self.default_tier.name,
        }


def _column(values: Any, n: int, name: str) -> Sequence[Any]:
    if values is None or isinstance(values, str | int | float):
        return [values] * n
    if hasattr(values, "to_pylist"):
        values = values.to_pylist()
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} rows, decisions has {n}")
    return values


def default_policy(low_rate: float = 0.1, near: float = 0.1, wait_s: float = 0.05) -> RiskPolicy:
    """The policy for the fraud example.

    ``decision == "block"`` is high risk (kept always, refused when there is no room);
    ``|score - threshold| < near`` is medium (kept always, waits up to ``wait_s`` for room, then
    dropped and counted); everything else is low (kept with probability ``low_rate``, dropped and
    counted when there is no room).
    """
    if not 0.0 < low_rate <= 1.0:
        raise ConfigError(f"low_rate must be in (0, 1], got {low_rate!r}")
    high = RiskTier(HIGH, 1.0, OVERFLOW_REFUSE, high_risk=True)
    medium = RiskTier(MEDIUM, 1.0, OVERFLOW_WAIT, timeout_s=wait_s, on_timeout=OVERFLOW_DROP)
    low = RiskTier(LOW, low_rate, OVERFLOW_DROP)
    return RiskPolicy(
        rules=(
            RiskRule(high, decision="block", name="fraud blocks"),
            RiskRule(medium, near_threshold=near, name="near the threshold"),
        ),
        default_tier=low,
    )


def keep_everything_policy() -> RiskPolicy:
    """No sampling: one tier that keeps every entry and drops (counted) when the buffer is full."""
    return RiskPolicy(rules=(), default_tier=RiskTier("default", 1.0, OVERFLOW_DROP, high_risk=False))


def build_policy(value: RiskPolicy | Mapping[str, Any] | str | None) -> RiskPolicy:
    """The policy a journal config names: ``None``, ``"default"``, a mapping or a policy."""
    if value is None:
        return keep_everything_policy()
    if isinstance(value, RiskPolicy):
        return value
    if value == "default":
        return default_policy()
    if isinstance(value, Mapping):
        return RiskPolicy.from_dict(value)
    raise ConfigError(
        f"risk_policy must be None, 'default', a mapping or a RiskPolicy, got {type(value).__name__}"
    )
