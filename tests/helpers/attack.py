"""The journal the attacker tests start from (local folder and S3 alike).

Three signed writer chains: producers p-1 and p-2 on one day (compacted by the caller), p-3 on
a later day left hot whose seq 0..4 were sampled out; exact counters signed by a replica's
counters key: p-1's counts in two chained files, and p-3's sampled-out range.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pyarrow as pa

from serve_journal.catalog.layout import split_by_partition
from serve_journal.counters import KEPT, SAMPLED_OUT, CounterSet, CountersSigner
from serve_journal.integrity.manifest import ManifestLog
from serve_journal.sink.settings import manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import JournalStorage
from tests.helpers.entries import DAY, make_entries

COMPACT_AT = DAY + dt.timedelta(days=2)
"""When the caller compacts: the first day is finished, the late day is not."""
LATE_SEQ = 5
"""The late producer's first written seq: 0..4 were sampled out (signed counters say so)."""


def write_journal_to_attack(storage: JournalStorage, open_chain: Callable[[str], ManifestLog],
                            counters_key: CountersSigner) -> pa.Table:
    """Write the journal through the writer path; returns every entry written."""
    tables = []
    plan = (("w00", "p-1", DAY, 0, 3), ("w01", "p-2", DAY, 0, 3),
            ("w02", "p-3", COMPACT_AT - dt.timedelta(hours=3), LATE_SEQ, 1))
    for chain, producer, start, seq_start, rolls in plan:
        log = open_chain(chain)
        writer = PartitionFileWriter(storage, chain, roll_seconds=3600.0, roll_bytes=1 << 40,
                                     on_file_written=[manifest_hook(log)])
        for k in range(rolls):
            table = make_entries(20, producer=producer, seq_start=seq_start + 20 * k,
                                 start=start + dt.timedelta(minutes=70 * k), spread_s=600)
            tables.append(table)
            for batch in table.to_batches():
                for key, part in split_by_partition(batch):
                    writer.add(key, part)
            writer.roll_all()
        log.checkpoint()
    ts_us = int(DAY.timestamp() * 1_000_000)
    p1, p3 = CounterSet("p-1", counters_key), CounterSet("p-3", counters_key)
    for counters, seqs, disposition in ((p1, range(0, 30), KEPT), (p1, range(30, 60), KEPT),
                                        (p3, range(0, LATE_SEQ), SAMPLED_OUT)):
        for seq in seqs:
            counters.record("fraud", "3", ts_us, "allow", "low", 0.1, "ok", seq, disposition)
        counters.flush_to(storage)
    return pa.concat_tables(tables)
