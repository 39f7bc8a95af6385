"""Local test journals: reading every hot Parquet file the blunt way (end-to-end tests compare
against it), and the counters key a replica would hold."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serve_journal.integrity.certificates import COUNTERS_KEY_FILE, provision_key
from serve_journal.integrity.manifest import ManifestSigner
from serve_journal.schema import ENTRY_SCHEMA, conform_entries
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import local_root


def read_journal(root: Path) -> pa.Table:
    """Every row of every hot data file below ``root`` (no catalog: tests compare against it)."""
    files = sorted(glob.glob(str(root / "hot" / "**" / "*.parquet"), recursive=True))
    tables = [conform_entries(pq.ParquetFile(f).read(), stored=True) for f in files]  # v1 and v2 files
    return pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()


def counters_signer(journal_uri: str) -> ManifestSigner:
    """The replicas' counters key for a local test journal, certified by the journal's signing
    key and published in the journal, as ``serve-journal init-keys`` does."""
    settings = SinkSettings(journal_uri=journal_uri)
    root = local_root(journal_uri)
    assert root is not None, "a local journal"
    path = os.path.join(os.path.dirname(root), "journal-keys", "keys", COUNTERS_KEY_FILE)
    return provision_key(path, settings.signer(), settings.storage())


def signing_key_files(folder: Path) -> tuple[Path, Path]:
    """A fresh manifest signing key in ``folder/keys/signing.pem`` and the auditor's copy of its
    public key in ``folder/auditor.pub.pem``: ``(key file, public key file)``."""
    key_file = folder / "keys" / "signing.pem"
    key_file.parent.mkdir()
    signer = ManifestSigner.generate()
    signer.save(key_file)
    public = folder / "auditor.pub.pem"
    public.write_bytes(signer.export_public_key())
    return key_file, public


def write_signed(settings, storage, chain_id: str, table: pa.Table, files: int) -> None:
    """Write ``table`` as a writer would, ``files`` rolls per hour partition, each file recorded
    in the signed manifest chain ``chain_id`` (checkpointed at the end)."""
    from serve_journal.catalog.layout import split_by_partition
    from serve_journal.sink.settings import manifest_hook
    from serve_journal.sink.writer import PartitionFileWriter

    log = settings.manifest(storage, chain_id)
    writer = PartitionFileWriter(storage, chain_id, roll_seconds=3600.0, roll_bytes=1 << 40,
                                 on_file_written=[manifest_hook(log)])
    step = -(-table.num_rows // files)
    for start in range(0, table.num_rows, step):
        for batch in table.slice(start, step).to_batches():
            for key, part in split_by_partition(batch):
                writer.add(key, part)
        writer.roll_all()
    log.checkpoint()
