"""Outcomes under attack (issue 18 review): an attacker who can create, overwrite and delete
objects in the journal's storage but holds no key. Real parts only: local folders, signed
manifest chains, real subprocesses killed with SIGKILL."""

from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import encode_parquet
from serve_journal.outcomes.record import load_outcomes, record_outcomes
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import write_signed

RECORDED = DAY + dt.timedelta(days=30)


@pytest.fixture
def journal(tmp_path):
    root = str(tmp_path / "journal")
    settings = SinkSettings(journal_uri=root)
    storage = settings.storage()
    entries = make_entries(30, start=DAY, spread_s=3600)
    write_signed(settings, storage, "w00", entries, files=2)
    return root, settings, storage, entries


def _plant_entries(storage, table: pa.Table, name: str) -> str:
    """An entry file put straight into the hot tier: no manifest record, nothing signed."""
    key = DEFAULT_SPEC.key_for(table["model_name"][0].as_py(), table["ts"][0].as_py())
    path = DEFAULT_SPEC.file_path(key, name)
    storage.put_new(path, encode_parquet(table))
    return path


def test_an_outcome_for_a_request_id_only_a_planted_entry_file_holds_is_rejected(journal):
    root, _, storage, _ = journal
    fake = make_entries(3, start=DAY + dt.timedelta(minutes=5), producer="p-planted")
    _plant_entries(storage, fake, "planted")
    later = DAY + dt.timedelta(days=2)
    batch = [{"request_id": r, "label": True, "outcome_time": later}
             for r in fake["request_id"].to_pylist()]
    report = record_outcomes(root, batch, source="chargebacks", now=RECORDED)
    assert (report.accepted, report.rejected_by_kind) == (0, {"unknown_request_id": 3})
    assert load_outcomes(root).num_rows == 0


def test_an_outcome_for_a_request_id_planted_into_a_recorded_file_is_rejected(journal):
    """The attacker overwrites a recorded entry file with one that also holds a made-up request:
    its bytes no longer match the signed record, so the file vouches for no request id."""
    root, _, storage, entries = journal
    path = sorted(storage.list_files("hot", ".parquet"))[0]
    original = __import__("serve_journal.fileformat", fromlist=["decode_parquet"]).decode_parquet(
        storage.read(path))
    fake = make_entries(1, start=original["ts"][0].as_py(), producer="p-planted")
    full = os.path.join(root, path)
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(encode_parquet(pa.concat_tables([original, fake])))
    later = DAY + dt.timedelta(days=2)
    report = record_outcomes(root, [{"request_id": fake["request_id"][0].as_py(), "label": True,
                                     "outcome_time": later}], source="chargebacks", now=RECORDED)
    assert report.rejected_by_kind == {"unknown_request_id": 1}, report
