"""A randomized attacker against verify: someone who can create, overwrite, delete and rename any
object in the journal's storage, but holds no key.

Each example builds a real journal (two writer chains written through the writer path, signed,
a finished day compacted by `run_compaction`, so there are data files, manifest records,
checkpoints and a signed commit marker; exact counters signed by a replica's certified counters
key, one of them explaining a gap), runs verify once as the auditor did before (keeping the chain
heads), applies one random mutation to one object of any area (data, records, checkpoints,
markers, counters, key certificates), and checks: verify (with the remembered heads) fails and
names the object (or the file or chain it concerns; an added compacted or cold file that readers
ignore, what a rewrite that died before recording leaves, is named as a warning), unless the
mutation means nothing (the same bytes or the same signed content, or deleting a checkpoint a
later one of the same chain supersedes); and when verify passes, readers see exactly the entries
that were written. Records, checkpoints and markers are canonical JSON, so any byte changed in one
is a finding, not a no-op. The S3 variant (versioned bucket with Object Lock) is
`tests/test_adversary_s3.py`.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_journal.counters import read_counters_file
from serve_journal.maintain.compaction import run_compaction
from serve_journal.read.query import JournalQuery
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings
from tests.helpers.attack import COMPACT_AT, write_journal_to_attack
from tests.helpers.entries import ids
from tests.helpers.journal import counters_signer

AREAS = ("hot/", "cold/", "_manifest/", "_checkpoints/", "_commits/", "_counters/", "_keys/")


def _build(root: str) -> tuple[SinkSettings, pa.Table]:
    settings = SinkSettings(journal_uri=root)
    storage = settings.storage()
    written = write_journal_to_attack(storage, lambda c: settings.manifest(storage, f"{c}-adv"),
                                      counters_signer(root))
    report = run_compaction(root, apply=True, now=COMPACT_AT)
    assert report.compacted, report.describe()
    return settings, written


def _objects(root: str) -> list[str]:
    out = []
    for area in AREAS:
        base = os.path.join(root, area)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.startswith("."):
                    out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _write(root: str, relative: str, data: bytes) -> None:
    full = os.path.join(root, relative)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if os.path.exists(full):
        os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(data)


def _renamed(path: str, salt: int) -> str:
    folder, name = path.rsplit("/", 1)
    stem, dot, ext = name.rpartition(".")
    if stem.isdigit():  # manifest records and checkpoints are numbered
        return f"{folder}/{int(stem) + 1 + salt % 50:012d}.{ext}"
    return f"{folder}/{stem}-x{salt % 97}.{ext}"


def _same_counters(path: str, old: bytes, new: bytes) -> bool:
    if not path.startswith("_counters/"):
        return False
    try:
        a, b = read_counters_file(path, old), read_counters_file(path, new)
    except Exception:  # noqa: BLE001 - unreadable now: a finding, not a no-op
        return False
    return a.message() == b.message() and a.signature == b.signature


def _superseded_checkpoint(path: str, objects: list[str]) -> bool:
    """A checkpoint a later checkpoint of the same chain supersedes: the later one signs
    everything it signed, so removing it takes no evidence away."""
    parts = path.split("/")
    if parts[0] != "_checkpoints" or len(parts) != 3:
        return False
    length = int(parts[2].split(".")[0])
    return any(o.startswith(f"_checkpoints/{parts[1]}/") and int(o.rsplit("/", 1)[1].split(".")[0])
               > length for o in objects)


def _names_it(text: str, *paths: str) -> bool:
    """The report names the object, its file stem (a marker and its file share one), or its
    chain's folder (records and checkpoints)."""
    for path in paths:
        if path in text:
            return True
        parts = path.split("/")
        if parts[0] in ("_manifest", "_checkpoints") and len(parts) >= 2 and parts[1] in text:
            return True
        stem = parts[-1].rsplit(".", 1)[0]
        if not stem.isdigit() and stem in text:
            return True
    return False


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(["delete", "flip", "rename", "copy", "truncate"]),
       pick=st.integers(min_value=0, max_value=10_000), where=st.floats(0.0, 1.0),
       salt=st.integers(min_value=0, max_value=10_000))
def test_every_mutation_of_any_object_fails_verify_and_names_it(op, pick, where, salt):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "journal")
        settings_, written = _build(root)
        storage = settings_.storage()
        key = settings_.public_key_path()
        heads = verify_journal(storage, public_key=key).heads  # what the auditor saw last time
        objects = _objects(root)
        target = objects[pick % len(objects)]
        full = os.path.join(root, target)
        with open(full, "rb") as handle:
            before = handle.read()
        named = [target]
        if op == "delete":
            os.unlink(full)
            meaningless = _superseded_checkpoint(target, objects)
        elif op == "flip":
            data = bytearray(before)
            position = min(int(where * len(data)), len(data) - 1)
            data[position] ^= 0x01 << (salt % 8)
            _write(root, target, bytes(data))
            # Evidence objects are canonical bytes; a counters file is signed over its content
            # (path, rows, key id, chain link), so a flip that changes no content means nothing.
            meaningless = bytes(data) == before or _same_counters(target, before, bytes(data))
        elif op == "truncate":
            cut = before[: int(where * len(before))]
            _write(root, target, cut)
            meaningless = cut == before
        elif op == "rename":
            new = _renamed(target, salt)
            os.unlink(full)
            _write(root, new, before)
            named.append(new)
            meaningless = False
        else:  # copy: a second object with the same bytes under a new name
            new = _renamed(target, salt)
            if os.path.exists(os.path.join(root, new)):
                return
            _write(root, new, before)
            named.append(new)
            meaningless = False
        # The auditor checks later than the unsigned grace period (writers have long signed
        # everything by then), so a deleted newest checkpoint leaves a tail that vouches for
        # nothing rather than a tail still in its grace period.
        report = verify_journal(storage, public_key=key, expected_heads=heads,
                                now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        text = format_report(report)
        if meaningless:
            assert report.ok, text
        else:
            # Failed, or (only for an added compacted/cold file readers ignore, which is what a
            # rewrite that died before recording leaves) a warning naming it.
            warned = {p.path for p in report.warnings} & set(named[1:])
            assert not report.ok or (op == "copy" and warned), \
                f"{op} {named} went unnoticed:\n{text}"
            assert _names_it(text, *named), f"{op} {named} not named:\n{text}"
        if report.ok:  # readers never show what verify would reject
            with JournalQuery(storage, actor="adversary-test") as query:
                assert ids(query.find(tier="all")) == ids(written)
