"""Deterministic keyed sampling: which entries of a tier are kept (docs/operations.md).

An entry is kept iff ``HMAC-SHA256(key, request_id)``, read as a uniform number ``u`` in [0, 1),
is below its tier's rate (:mod:`serve_journal.policy`). ``u`` is the first 8 bytes of the digest
as a big-endian integer, shifted right by 11 bits (53 bits) and divided by 2**53, so the keep
decision can be re-derived later from the request id, the journal's ``sample_rate`` column and
the key. :class:`Sampler` is what the flusher calls once per batch.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve_journal.policy import RiskPolicy, RiskTier

_SAMPLING_CONTEXT = b"serve_journal/sampling/v1"
_TWO_53 = float(1 << 53)


def derive_sampling_key(master_key: bytes) -> bytes:
    """A sampling key derived from a journal HMAC key (so one secret serves both purposes
    without the sampling hash ever equalling a feature HMAC)."""
    if not isinstance(master_key, bytes | bytearray) or len(master_key) < 16:
        raise ValueError("master_key must be at least 16 bytes")
    return hmac.digest(bytes(master_key), _SAMPLING_CONTEXT, "sha256")


def sampling_uniform(request_id: str, key: bytes) -> float:
    """The uniform number in [0, 1) that decides whether ``request_id`` is kept."""
    digest = hmac.digest(key, request_id.encode("utf-8", "surrogatepass"), "sha256")
    return (int.from_bytes(digest[:8], "big") >> 11) / _TWO_53


def would_keep(request_id: str, rate: float, key: bytes) -> bool:
    """Whether an entry with ``request_id`` is kept at ``rate`` (re-derivable later)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return sampling_uniform(request_id, key) < rate


def keep_mask(request_ids: Sequence[str], rates: Sequence[float] | float, key: bytes) -> list[bool]:
    """:func:`would_keep` over a batch; ``rates`` is a list or one rate for every entry."""
    if isinstance(rates, int | float):
        rates = [rates] * len(request_ids)
    elif len(rates) != len(request_ids):
        raise ValueError(f"rates has {len(rates)} rows, request_ids has {len(request_ids)}")
    # HMAC with the key's inner and outer pads hashed once: half the cost of hmac.digest per id.
    inner, outer = _hmac_pads(key)
    out = []
    append = out.append
    for request_id, rate in zip(request_ids, rates, strict=True):
        if rate >= 1.0:
            append(True)
        elif rate <= 0.0:
            append(False)
        else:
            h = inner.copy()
            h.update(request_id.encode("utf-8", "surrogatepass"))
            o = outer.copy()
            o.update(h.digest())
            append((int.from_bytes(o.digest()[:8], "big") >> 11) / _TWO_53 < rate)
    return out


def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after the HMAC inner and outer key pads (RFC 2104)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


@dataclass(frozen=True)
class BatchAssignment:
    """The flusher's verdict on a batch: each entry's tier and whether it is kept."""

    tiers: list[RiskTier]
    keep: list[bool]

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    @property
    def sample_rates(self) -> list[float]:
        return [tier.sample_rate for tier in self.tiers]


class Sampler:
    """A policy with its sampling key: what the flusher calls once per finalized batch.

    Built in the replica (the key is a secret and never appears in its repr or pickles).
    """

    __slots__ = ("policy", "_key")

    def __init__(self, policy: RiskPolicy, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            raise ValueError("sampling key must be at least 16 bytes")
        self.policy = policy
        self._key = bytes(key)

    def __repr__(self) -> str:
        return f"Sampler(tiers={sorted(self.policy.tiers)}, key=<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("Sampler holds a secret key and is not picklable; build it in the replica")

    def keep(self, request_id: str, rate: float) -> bool:
        """:func:`would_keep` with this sampler's key."""
        return would_keep(request_id, rate, self._key)

    def assign(
        self,
        request_ids: Sequence[str],
        decisions: Sequence[str | None],
        scores: Sequence[Any] | None = None,
        thresholds: Sequence[Any] | Any = None,
        models: Sequence[str | None] | str | None = None,
        callers: Sequence[str | None] | str | None = None,
        outcomes: Sequence[str | None] | str | None = None,
        attributes: Sequence[Mapping[str, Any] | None] | None = None,
        tiers: Sequence[RiskTier | None] | None = None,
    ) -> BatchAssignment:
        """Classify a batch and decide which entries are kept.

        ``tiers`` may carry tiers already decided on the request path (``None`` where not); those
        are not classified again, so an entry that was admitted as high risk stays high risk.
        """
        computed = self.policy.classify_many(
            decisions, scores, thresholds, models, callers, outcomes, attributes
        )
        if tiers is not None:
            computed = [given or tier for given, tier in zip(tiers, computed, strict=True)]
        mask = keep_mask(request_ids, [tier.sample_rate for tier in computed], self._key)
        return BatchAssignment(computed, mask)
