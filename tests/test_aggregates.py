"""Exact counters beside a real Parquet journal; weighted estimates; every sequence gap accounted."""

from __future__ import annotations

import datetime as dt
import math
import random
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC, escape_value
from serve_journal.counters import (
    COUNTER_SCHEMA,
    COUNTERS_DIR,
    DROPPED,
    KEPT,
    SAMPLED_OUT,
    CounterSet,
    counters_path,
    decode_counters,
    encode_counters,
    merge_runs,
)
from serve_journal.fileformat import encode_parquet
from serve_journal.policy import default_policy
from serve_journal.read.stats import accounted_gaps, estimate_groups, load_counters, stats
from serve_journal.sampling import Sampler, derive_sampling_key, keep_mask
from serve_journal.schema import COLUMN_NAMES, ENTRY_SCHEMA
from serve_journal.storage import LocalJournalStorage, ObjectExistsError

MODEL = "fraud/detector v2"  # needs escaping in paths
THRESHOLD = 0.5
START_US = int(dt.datetime(2026, 3, 1, 23, 40, tzinfo=dt.UTC).timestamp() * 1_000_000)
N_PER_PRODUCER = 10_000
PRODUCERS = ("replica-a", "replica-b")
BATCH = 1_000


def _population(seed: int) -> list[dict]:
    """Synthetic entries with known decision and caller rates, crossing midnight (two dates)."""
    rng = random.Random(seed)
    entries = []
    for producer in PRODUCERS:
        ts = START_US
        for seq in range(N_PER_PRODUCER):
            ts += rng.randint(100_000, 300_000)  # ~20 min per producer: 23:40 -> past midnight
            score = rng.random()
            outcome = "error" if rng.random() < 0.01 else "ok"
            decision = None if outcome == "error" else ("block" if score >= 0.95 else "allow")
            entries.append({
                "request_id": f"{producer}-{seq}-{rng.getrandbits(32):08x}",
                "ts": ts,
                "caller": "partner-a" if rng.random() < 0.3 else "partner-b",
                "score": None if outcome == "error" else score,
                "decision": decision,
                "outcome": outcome,
                "producer_id": producer,
                "seq": seq,
            })
    return entries


def _entry_table(rows: list[dict], tiers: list[str], rates: list[float]) -> pa.Table:
    n = len(rows)
    cols = {
        "schema_version": [1] * n,
        "request_id": [r["request_id"] for r in rows],
        "ts": [r["ts"] for r in rows],
        "caller": [r["caller"] for r in rows],
        "subject_token": [None] * n,
        "model_name": [MODEL] * n,
        "model_version": ["3"] * n,
        "dataset_hash": [None] * n,
        "dataset_hash_source": ["none"] * n,
        "features_hmac": [None] * n,
        "key_id": [None] * n,
        "outputs": [None] * n,
        "score": [r["score"] for r in rows],
        "threshold": [THRESHOLD] * n,
        "decision": [r["decision"] for r in rows],
        "explanation_ref": [None] * n,
        "outcome": [r["outcome"] for r in rows],
        "error_type": [None] * n,
        "latency_ms": [1.0] * n,
        "risk_tier": tiers,
        "sample_rate": rates,
        "producer_id": [r["producer_id"] for r in rows],
        "seq": [r["seq"] for r in rows],
        "app_name": ["app"] * n,
        "deployment": ["Fraud"] * n,
        "replica": [r["producer_id"] for r in rows],
        "model_run_id": [None] * n,
        "model_digest": [None] * n,
        "models": [None] * n,
        "trace_id": [None] * n,
        "span_id": [None] * n,
    }
    assert list(cols) == list(COLUMN_NAMES)
    return pa.table(cols, schema=ENTRY_SCHEMA)


def _simulate(storage, entries, key, drop_low_seqs=range(0)):
    """What the flusher does: per batch classify, sample, write kept entries, count everything.

    Low-risk entries whose seq is in ``drop_low_seqs`` are dropped on the request path instead
    (a full buffer), the way the wrapper records them.
    """
    policy = default_policy(low_rate=0.1)
    sampler = Sampler(policy, key)
    counters = {p: CounterSet(p) for p in PRODUCERS}
    truth = Counter()
    file_no = 0
    for producer in PRODUCERS:
        mine = [e for e in entries if e["producer_id"] == producer]
        for start in range(0, len(mine), BATCH):
            batch = []
            for e in mine[start:start + BATCH]:
                tier = policy.classify(e["decision"], e["score"], THRESHOLD, MODEL, e["caller"], e["outcome"])
                if tier.name == "low" and e["seq"] in drop_low_seqs:
                    counters[producer].record(MODEL, "3", e["ts"], e["decision"], tier.name,
                                              tier.sample_rate, e["outcome"], e["seq"], DROPPED,
                                              "buffer_full")
                    truth[(e["decision"], tier.name, e["outcome"], DROPPED)] += 1
                else:
                    batch.append(e)
            result = sampler.assign(
                [e["request_id"] for e in batch], [e["decision"] for e in batch],
                [e["score"] for e in batch], THRESHOLD, MODEL, [e["caller"] for e in batch],
                [e["outcome"] for e in batch],
            )
            counters[producer].record_batch(
                MODEL, "3", [e["ts"] for e in batch], [e["decision"] for e in batch],
                result.tier_names, result.sample_rates, [e["outcome"] for e in batch],
                [e["seq"] for e in batch], result.keep,
            )
            for e, t, k in zip(batch, result.tier_names, result.keep, strict=True):
                truth[(e["decision"], t, e["outcome"], KEPT if k else SAMPLED_OUT)] += 1
            kept = [(e, t, r) for e, t, r, k in zip(batch, result.tier_names, result.sample_rates,
                                                     result.keep, strict=True) if k]
            by_partition = {}
            for e, t, r in kept:
                part = DEFAULT_SPEC.key_for_micros(MODEL, e["ts"])
                by_partition.setdefault(part, []).append((e, t, r))
            for part, items in by_partition.items():
                table = _entry_table([i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
                storage.put_new(DEFAULT_SPEC.file_path(part, f"{producer}-{file_no:06d}"),
                                encode_parquet(table))
                file_no += 1
            if (start // BATCH) % 3 == 2:
                counters[producer].flush_to(storage)
        counters[producer].flush_to(storage)
    return truth


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    storage = LocalJournalStorage(str(tmp_path_factory.mktemp("journal")))
    entries = _population(seed=20260301)
    drops = set(range(4_000, 4_600))
    truth = _simulate(storage, entries, derive_sampling_key(b"s" * 32), drop_low_seqs=drops)
    return storage, entries, truth


def test_counters_are_exact_and_persisted_per_model_and_date(journal):
    storage, entries, truth = journal
    files = storage.list_files(COUNTERS_DIR)
    assert files and all(f.startswith(f"{COUNTERS_DIR}/model={escape_value(MODEL)}/date=") for f in files)
    assert {f.split("/")[2] for f in files} == {"date=2026-03-01", "date=2026-03-02"}

    table = load_counters(storage, model=MODEL)
    got = Counter()
    for d, t, o, disp, n in zip(*(table[c].to_pylist() for c in
                                  ("decision", "risk_tier", "outcome", "disposition", "count")), strict=True):
        got[(d, t, o, disp)] += n
    assert got == truth
    assert sum(got.values()) == len(entries)
    assert sum(n for k, n in got.items() if k[3] == DROPPED) == 2 * 600 - sum(
        1 for e in entries if 4_000 <= e["seq"] < 4_600
        and default_policy().classify(e["decision"], e["score"], THRESHOLD).name != "low"
    )
    # A window selects whole minutes.
    since = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    after = load_counters(storage, since=since, model=MODEL)
    expected = sum(1 for e in entries if e["ts"] >= int(since.timestamp() * 1e6))
    assert sum(after["count"].to_pylist()) == expected > 0
    assert load_counters(storage, model="other").num_rows == 0


def test_every_sequence_gap_is_accounted(journal):
    storage, entries, _ = journal
    gaps = accounted_gaps(storage)
    assert set(gaps) == set(PRODUCERS)
    journal_seqs = {p: set() for p in PRODUCERS}
    for path in storage.list_files("hot/"):
        table = pq.ParquetFile(pa.BufferReader(storage.read(path))).read(columns=["producer_id", "seq"])
        for p, s in zip(table["producer_id"].to_pylist(), table["seq"].to_pylist(), strict=True):
            assert s not in journal_seqs[p]
            journal_seqs[p].add(s)
    for producer in PRODUCERS:
        covered = set(journal_seqs[producer])
        reasons = Counter()
        for lo, hi, reason in gaps[producer]:
            span = set(range(lo, hi + 1))
            assert not span & covered, "a gap overlaps a journaled entry or another gap"
            covered |= span
            reasons[reason] += hi - lo + 1
        assert covered == set(range(N_PER_PRODUCER))
        assert reasons["dropped:buffer_full"] > 0 and reasons["sampled_out"] > 0
        assert set(reasons) == {"dropped:buffer_full", "sampled_out"}
        # Run-length ranges are compact: far fewer ranges than gap entries.
        assert len(gaps[producer]) < sum(reasons.values()) / 3


def test_stats_exact_counts_and_estimates(journal, capsys):
    storage, entries, _ = journal
    report = stats(storage, model=MODEL, group_by=("decision", "risk_tier"))
    assert report.captured == len(entries)
    assert report.kept == report.journal_rows
    assert report.dropped == report.dropped_by_reason["buffer_full"] > 0
    truth = Counter((e["decision"], default_policy().classify(e["decision"], e["score"], THRESHOLD).name)
                    for e in entries)
    for g in report.groups:
        key = (g.group["decision"], g.group["risk_tier"])
        assert g.exact == truth[key]
        if g.group["risk_tier"] != "low":  # rate 1.0: the estimate is the count, no error
            assert g.estimate == g.kept == g.exact - g.dropped and g.se == 0
    with capsys.disabled():
        print("\n" + report.format_text())

    # A grouping the counters do not have: the share of partner-a, estimated from the sample.
    by_caller = stats(storage, model=MODEL, group_by=("caller",))
    sampled_population = [e for e in entries if not (
        4_000 <= e["seq"] < 4_600
        and default_policy().classify(e["decision"], e["score"], THRESHOLD).name == "low")]
    true_share = sum(e["caller"] == "partner-a" for e in sampled_population) / len(sampled_population)
    group = next(g for g in by_caller.groups if g.group["caller"] == "partner-a")
    assert group.exact is None and group.se > 0
    lo, hi = group.rate_ci95
    assert lo <= true_share <= hi, (true_share, group.rate_ci95)
    assert hi - lo < 0.05  # and the interval is informative
    with capsys.disabled():
        print(f"[stats] partner-a share: true {true_share:.4f}, estimate {group.rate:.4f}, "
              f"95% CI [{lo:.4f}, {hi:.4f}]")


def test_interval_coverage_over_sampling_keys():
    """The stated 95 % interval covers the truth about 95 % of the time across sampling keys."""
    rng = random.Random(11)
    n = 20_000
    callers = ["a" if rng.random() < 0.3 else "b" for _ in range(n)]
    ids = [f"req-{i}-{rng.getrandbits(32)}" for i in range(n)]
    rates = [1.0 if rng.random() < 0.05 else 0.1 for _ in range(n)]  # 5 % high risk, kept always
    truth = callers.count("a")
    covered, widths = 0, []

    trials = 40
    for trial in range(trials):
        key = derive_sampling_key(trial.to_bytes(4, "big") * 8)
        keep = keep_mask(ids, rates, key)
        sample = pa.table({
            "caller": [c for c, k in zip(callers, keep, strict=True) if k],
            "sample_rate": pa.array([r for r, k in zip(rates, keep, strict=True) if k], pa.float32()),
        })
        _, estimate, se = estimate_groups(sample, ["caller"])[("a",)]
        covered += abs(estimate - truth) <= 1.96 * se
        widths.append(se)
    # Theoretical standard error of the count of "a" under Poisson sampling.
    theory = math.sqrt(sum((1 - r) / r for c, r in zip(callers, rates, strict=True) if c == "a"))
    assert covered >= 0.85 * trials, covered
    assert 0.8 * theory < sum(widths) / trials < 1.2 * theory


def test_counter_set_is_thread_safe_and_merges_ranges():
    counters = CounterSet("p")
    per_thread = 5_000

    def work(offset):
        for i in range(per_thread):
            seq = offset + i
            counters.record("m", "1", START_US + seq, "allow", "low", 0.1, "ok", seq,
                            SAMPLED_OUT if seq % 3 else KEPT)

    threads = [threading.Thread(target=work, args=(k * per_thread,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = counters.totals()
    assert totals[KEPT] + totals[SAMPLED_OUT] == 4 * per_thread
    snap = counters.snapshot_and_reset()
    assert counters.totals() == {KEPT: 0, SAMPLED_OUT: 0, DROPPED: 0}
    table = snap.to_table()
    gaps = table.filter(pc.equal(table["kind"], "gap"))
    spans = sorted(zip(gaps["seq_lo"].to_pylist(), gaps["seq_hi"].to_pylist(), strict=True))
    assert sum(hi - lo + 1 for lo, hi in spans) == totals[SAMPLED_OUT]
    assert merge_runs([(5, 7), (1, 2), (3, 3), (9, 9)]) == [(1, 3), (5, 7), (9, 9)]


class _FlakyStorage(LocalJournalStorage):
    """A real local journal whose next ``fail`` writes raise, like an unreachable bucket."""

    def __init__(self, root, fail):
        super().__init__(root)
        self.fail = fail

    def put_new(self, relative, data):
        if self.fail:
            self.fail -= 1
            raise OSError("storage unavailable")
        return super().put_new(relative, data)


def test_failed_flush_restores_counts_and_existing_names_are_skipped(tmp_path):
    storage = _FlakyStorage(str(tmp_path), fail=1)
    counters = CounterSet("rep/1")  # escaped in the file name
    for seq in range(10):
        counters.record(MODEL, "1", START_US, "allow", "low", 0.1, "ok", seq,
                        KEPT if seq % 2 else SAMPLED_OUT)
    with pytest.raises(OSError, match="storage unavailable"):
        counters.flush_to(storage)  # used file number 0
    assert counters.totals()[KEPT] == 5 and counters.totals()[SAMPLED_OUT] == 5
    # Someone else's file already has number 1 (a reused producer id): it is skipped, not replaced.
    foreign = encode_counters(COUNTER_SCHEMA.empty_table())
    storage.put_new(counters_path(MODEL, "2026-03-01", "rep/1", 1), foreign)
    written = counters.flush_to(storage)
    assert len(written) == 1 and written[0].path.endswith("rep%2F1-00000002.parquet")
    table = decode_counters(storage.read(written[0].path))
    counts = table.filter(pc.equal(table["kind"], "count"))
    assert sum(counts["count"].to_pylist()) == 10
    assert accounted_gaps(storage)["rep/1"] == [(0, 0, "sampled_out"), (2, 2, "sampled_out"),
                                                (4, 4, "sampled_out"), (6, 6, "sampled_out"),
                                                (8, 8, "sampled_out")]
    assert counters.flush_to(storage) == []  # nothing new: no empty files
    assert storage.read(counters_path(MODEL, "2026-03-01", "rep/1", 1)) == foreign
    with pytest.raises(ObjectExistsError):
        storage.put_new(written[0].path, b"x")  # create-only
    storage.put_new(counters_path(MODEL, "2026-03-01", "other", 0), b"garbage")
    with pytest.raises(ValueError, match="other-00000000.parquet is not a valid counters"):
        accounted_gaps(storage)
