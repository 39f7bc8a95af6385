"""Risk policy: validation, rule matching, deterministic sampling, configuration round trips."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import random
import statistics
import time

import pyarrow as pa
import pytest

from serve_journal.config import ConfigError
from serve_journal.policy import (
    OVERFLOW_DROP,
    OVERFLOW_REFUSE,
    OVERFLOW_WAIT,
    RiskPolicy,
    RiskRule,
    RiskTier,
    default_policy,
)
from serve_journal.sampling import (
    Sampler,
    derive_sampling_key,
    keep_mask,
    sampling_uniform,
    would_keep,
)

KEY = derive_sampling_key(b"k" * 32)

CONFIG = {
    "tiers": {
        "high": {"sample_rate": 1.0, "overflow": "refuse"},
        "medium": {"sample_rate": 1.0, "overflow": "wait", "timeout_s": 0.05},
        "low": {"sample_rate": 0.15, "overflow": "drop"},
        "vip": {"sample_rate": 0.5, "overflow": "wait", "timeout_s": 0.2, "on_timeout": "refuse"},
    },
    "rules": [
        {"tier": "high", "decision": ["block", "deny"]},
        {"tier": "high", "model": "loans", "score_min": 0.9},
        {"tier": "vip", "caller": ["partner-a"], "attributes": {"region": ["eu", "uk"]}},
        {"tier": "medium", "near_threshold": 0.1},
        {"tier": "high", "outcome": "rejected"},
    ],
    "default_tier": "low",
}


def test_high_risk_tier_refuses_sampling_and_dropping():
    with pytest.raises(ConfigError, match="sample_rate must be 1.0"):
        RiskTier("high", 0.5, OVERFLOW_REFUSE)
    with pytest.raises(ConfigError, match="sample_rate must be 1.0"):
        RiskTier("critical", 0.99, OVERFLOW_REFUSE, high_risk=True)
    with pytest.raises(ConfigError, match="overflow must be 'wait' or 'refuse'"):
        RiskTier("high", 1.0, OVERFLOW_DROP)
    with pytest.raises(ConfigError, match="on_timeout must be 'refuse'"):
        RiskTier("high", 1.0, OVERFLOW_WAIT, timeout_s=0.1, on_timeout="drop")
    tier = RiskTier("high", 1.0, OVERFLOW_WAIT, timeout_s=0.1)
    assert tier.high_risk and tier.on_timeout == OVERFLOW_REFUSE
    assert RiskTier("low", 0.1).high_risk is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "low", "sample_rate": 1.5}, "sample_rate must be a number in"),
        ({"name": "low", "sample_rate": True}, "sample_rate must be a number in"),
        ({"name": "low", "overflow": "block"}, "overflow must be one of"),
        ({"name": "low", "overflow": "wait"}, "needs timeout_s > 0"),
        ({"name": "low", "timeout_s": -1}, "timeout_s must be"),
        ({"name": "bad name/../x"}, "risk tier name must match"),
    ],
)
def test_tier_validation_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RiskTier(**kwargs)


def test_rates_are_float32_so_the_journal_column_holds_the_rate_in_force():
    tier = RiskTier("low", 0.1)
    stored = pa.array([tier.sample_rate], pa.float32()).to_pylist()[0]
    assert stored == tier.sample_rate
    assert tier.to_dict()["sample_rate"] == 0.1


def test_rules_match_in_order_first_wins():
    policy = RiskPolicy.from_dict(CONFIG)
    c = policy.classify
    assert c("block", 0.2, 0.5).name == "high"
    assert c("allow", 0.95, 0.5, model="loans").name == "high"
    assert c("allow", 0.95, 0.5, model="fraud").name == "low"
    assert c("allow", 0.2, 0.5, caller="partner-a", attributes={"region": "eu"}).name == "vip"
    assert c("allow", 0.2, 0.5, caller="partner-a", attributes={"region": "us"}).name == "low"
    assert c("allow", 0.2, 0.5, caller="partner-a").name == "low"
    assert c("allow", 0.45, 0.5).name == "medium"
    assert c("allow", 0.55, 0.5).name == "medium"
    assert c("allow", 0.61, 0.5).name == "low"  # |0.61 - 0.5| is not < 0.1
    assert c("allow", 0.45, None).name == "low"  # no threshold: near-threshold cannot match
    assert c(None, None, None, outcome="rejected").name == "high"
    assert c(None, None, None, outcome="error").name == "low"


def test_score_range_is_half_open_and_needs_a_score():
    tier = RiskTier("mid", 0.5)
    rule = RiskRule(tier, score_min=0.2, score_max=0.4)
    assert rule.matches(None, 0.2, None, None, None, None, None)
    assert not rule.matches(None, 0.4, None, None, None, None, None)
    assert not rule.matches(None, None, None, None, None, None, None)
    with pytest.raises(ConfigError, match="score_min must be below score_max"):
        RiskRule(tier, score_min=0.5, score_max=0.4)


def test_classify_never_raises_and_falls_back_to_the_strictest_tier():
    policy = RiskPolicy.from_dict(CONFIG)

    class Broken(dict):
        def get(self, key, default=None):
            raise RuntimeError("broken attributes")

    tier = policy.classify("allow", 0.2, 0.5, caller="partner-a", attributes=Broken(region="eu"))
    assert tier is policy.strictest_tier and tier.high_risk
    # Values of the wrong type are treated as missing, not errors.
    assert policy.classify("allow", "0.45", object()).name == "low"
    assert policy.classify("allow", float("nan"), 0.5).name == "low"
    assert policy.classify(["unhashable"], 0.2, 0.5).name in policy.tiers


def test_from_dict_round_trips_and_pickles():
    policy = RiskPolicy.from_dict(CONFIG)
    again = RiskPolicy.from_dict(policy.to_dict())
    assert again == policy
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert pickle.loads(pickle.dumps(default_policy())) == default_policy()
    with pytest.raises(AttributeError):
        policy.default_tier = policy.tier("high")  # frozen


@pytest.mark.parametrize(
    "change, message",
    [
        ({"default_tier": "nope"}, "default_tier must name a tier"),
        ({"rules": [{"tier": "nope"}]}, r"rules\[0\].tier must name a tier"),
        ({"rules": [{"tier": "low", "colour": "red"}]}, r"rules\[0\] has unknown key"),
        ({"rules": [{"tier": "low", "decision": []}]}, "decision must be a string or a non-empty list"),
        ({"rules": [{"tier": "low", "near_threshold": -1}]}, "near_threshold must be > 0"),
        ({"tiers": {"low": {"sample_rate": 0.1, "rate": 2}}}, "unknown setting"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_from_dict_errors_name_the_field(change, message):
    config = {**CONFIG, **change}
    with pytest.raises(ConfigError, match=message):
        RiskPolicy.from_dict(config)


def test_default_fraud_policy():
    policy = default_policy(low_rate=0.15)
    high, medium, low = policy.tier("high"), policy.tier("medium"), policy.tier("low")
    assert (high.sample_rate, high.overflow, high.high_risk) == (1.0, OVERFLOW_REFUSE, True)
    assert (medium.sample_rate, medium.overflow) == (1.0, OVERFLOW_WAIT)
    assert medium.timeout_s > 0
    assert (low.overflow, low.sample_rate) == (OVERFLOW_DROP, pytest.approx(0.15))
    assert policy.classify("block", 0.99, 0.5) is high
    assert policy.classify("allow", 0.41, 0.5) is medium
    assert policy.classify("allow", 0.05, 0.5) is low
    with pytest.raises(ConfigError):
        default_policy(low_rate=0)


def test_sampling_is_a_keyed_hmac_of_the_request_id():
    rid = "req-123"
    digest = hmac.new(KEY, rid.encode(), hashlib.sha256).digest()
    expected = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    assert sampling_uniform(rid, KEY) == expected
    assert would_keep(rid, 0.5, KEY) == (expected < 0.5)
    other = derive_sampling_key(b"x" * 32)
    ids = [f"r{i}" for i in range(200)]
    assert keep_mask(ids, 0.5, KEY) != keep_mask(ids, 0.5, other)  # the key matters
    assert all(would_keep(r, 1.0, KEY) for r in ids)
    assert not any(would_keep(r, 0.0, KEY) for r in ids)


def test_keep_mask_matches_would_keep_and_the_rate():
    rng = random.Random(7)
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(20_000)]
    rates = [0.1 if i % 2 else 0.2 for i in range(len(ids))]
    mask = keep_mask(ids, rates, KEY)
    assert mask == [would_keep(r, rate, KEY) for r, rate in zip(ids, rates, strict=True)]
    for rate in (0.1, 0.2):
        kept = sum(m for m, r in zip(mask, rates, strict=True) if r == rate)
        n = rates.count(rate)
        sd = (n * rate * (1 - rate)) ** 0.5
        assert abs(kept - n * rate) < 4 * sd  # a fair coin of bias `rate`
    long_key = bytes(range(100))  # longer than a SHA-256 block: hashed first (RFC 2104)
    assert keep_mask(ids[:500], 0.5, long_key) == [would_keep(r, 0.5, long_key) for r in ids[:500]]
    # Monotone in the rate: whatever is kept at 0.1 is kept at 0.2 (same uniform number).
    low = keep_mask(ids, 0.1, KEY)
    high = keep_mask(ids, 0.2, KEY)
    assert all(h for lo, h in zip(low, high, strict=True) if lo)


def test_sampler_assigns_batches_and_hides_its_key():
    policy = default_policy(low_rate=0.1)
    sampler = Sampler(policy, KEY)
    ids = [f"id-{i}" for i in range(1000)]
    decisions = ["block" if i % 10 == 0 else "allow" for i in range(1000)]
    scores = [0.95 if d == "block" else (0.45 if i % 10 == 1 else 0.05) for i, d in enumerate(decisions)]
    result = sampler.assign(ids, decisions, scores, thresholds=0.5, models="fraud")
    assert [t.name for t in result.tiers].count("high") == 100
    assert all(k for k, t in zip(result.keep, result.tiers, strict=True) if t.high_risk)
    assert all(k for k, t in zip(result.keep, result.tiers, strict=True) if t.name == "medium")
    lows = [k for k, t in zip(result.keep, result.tiers, strict=True) if t.name == "low"]
    assert 0 < sum(lows) < len(lows) / 2
    # A tier decided on the request path is kept as is.
    pre = [policy.tier("high")] + [None] * 999
    decided = sampler.assign(ids, ["allow"] * 1000, [0.0] * 1000, 0.5, tiers=pre)
    assert decided.tiers[0].name == "high" and decided.keep[0]
    assert KEY.hex() not in repr(sampler)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(sampler)


def test_classify_cost_is_reported(capsys):
    """Measured, not asserted: the request path calls classify only when the buffer is full."""
    policy = RiskPolicy.from_dict(CONFIG)
    args = [("allow", 0.05 * (i % 20), 0.5, "fraud", "c", "ok", {"region": "us"}) for i in range(2000)]
    samples = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for a in args:
            policy.classify(*a)
        samples.append((time.perf_counter_ns() - start) / len(args) / 1000)
    ids = [f"req-{i}" for i in range(20_000)]
    start = time.perf_counter_ns()
    keep_mask(ids, 0.1, KEY)
    per_id = (time.perf_counter_ns() - start) / len(ids) / 1000
    with capsys.disabled():
        print(
            f"\n[policy] classify (5 rules, fall-through): median {statistics.median(samples):.2f} us/call; "
            f"keep_mask: {per_id:.2f} us/entry"
        )
    assert all(s > 0 for s in samples)
