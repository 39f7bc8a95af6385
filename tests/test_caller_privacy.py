"""caller_privacy="token": the journal records a keyed caller token, never the caller as given.

Entries are finalized with the replica's own EntryFinalizer and written with the writers' own code
(PartitionFileWriter and a signed manifest chain), encoded for Kafka with the wire format, then
every byte written is scanned for the raw caller. Replicas are separate processes sharing one
keyring file: they must agree on the caller token, also when the keyring predates the
caller-token key.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from serve_journal import caller_tokenizer
from serve_journal._private.entries import CapturedCall, EntryFinalizer, ReplicaIdentity
from serve_journal._private.wiring import build_caller_tokenizer
from serve_journal.catalog.layout import split_by_partition
from serve_journal.config import ConfigError, JournalConfig
from serve_journal.policy import build_policy
from serve_journal.privacy.keyring import KEK_ENV, PURPOSE_CALLER_TOKEN, Keyring
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.privacy.tokens import (
    CallerTokenizer,
    caller_token,
    is_caller_token,
    is_subject_token,
)
from serve_journal.read.query import JournalQuery, read_access_log
from serve_journal.registry import ModelInfo
from serve_journal.sampling import Sampler
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from serve_journal.transport.wire import (
    _ipc_stream,
    decode_message,
    encode_batch,
    encode_messages,
    pack_frame,
)

CALLER = "CANARY-CALLER-user-5f1c@example.org"


@pytest.fixture(autouse=True)
def _no_env_kek(monkeypatch):
    monkeypatch.delenv(KEK_ENV, raising=False)


def _call(seq: int, caller: str | None, subject: str = "alice") -> CapturedCall:
    model = ModelInfo("fraud", "3", "sha256:ab", "tag")
    annotations = {} if caller is None else {"caller": caller}
    return CapturedCall(seq, 1_741_080_000_000_000 + seq * 1000, f"r{seq}",
                        ({"subject_id": subject, "features": {"x": seq}},), {}, None, None,
                        {"score": 0.9}, "ok", None, 1.5, annotations, model)


def _finalizer(config: JournalConfig, keyring: Keyring, replica: str) -> EntryFinalizer:
    return EntryFinalizer(config, StaticKeyPseudonymizer("k1", b"k" * 32),
                          ReplicaIdentity(f"p-{replica}", "app", "Dep", replica),
                          Sampler(build_policy(None), b"s" * 32),
                          build_caller_tokenizer(config, keyring))


def test_option_is_validated_and_read_from_the_environment(monkeypatch):
    assert JournalConfig.resolve(model="m").caller_privacy == "plain"
    monkeypatch.setenv("SERVE_JOURNAL_CALLER_PRIVACY", "token")
    assert JournalConfig.resolve(model="m").caller_privacy == "token"
    assert JournalConfig.resolve(model="m", caller_privacy="plain").caller_privacy == "plain"
    with pytest.raises(ConfigError, match="caller_privacy must be one of"):
        JournalConfig.resolve(model="m", caller_privacy="hashed")


def test_plain_keeps_the_caller_and_token_records_a_keyed_token(tmp_path):
    keys = tmp_path / "journal-keys"
    plain = JournalConfig.resolve(model="fraud", journal_uri=str(tmp_path / "journal"))
    token = plain.with_overrides(caller_privacy="token")
    ring = Keyring.local_default(keys)
    assert build_caller_tokenizer(plain, ring) is None
    calls = [_call(0, CALLER), _call(1, None), _call(2, CALLER, "bob"), _call(3, "svc-b")]
    rows = pa.Table.from_batches([_finalizer(plain, ring, "r1").finalize(calls).batch]).to_pylist()
    assert [r["caller"] for r in rows] == [CALLER, "anonymous", CALLER, "svc-b"]

    rows = pa.Table.from_batches([_finalizer(token, ring, "r1").finalize(calls).batch]).to_pylist()
    callers = [r["caller"] for r in rows]
    assert callers[0] == callers[2] != callers[3]
    assert callers[1] == "anonymous"  # no identity: nothing personal to hide
    assert all(is_caller_token(c) for c in (callers[0], callers[3]))
    assert not is_subject_token(callers[0])  # never mistaken for (or equal to) a subject token
    assert callers[0] == caller_token(ring.purpose_key(PURPOSE_CALLER_TOKEN), CALLER)
    assert CALLER not in json.dumps(rows, default=str)
    # The caller-token key is its own key: not a subject-token, sampling or data key.
    assert caller_token(ring.data_key(), CALLER) != callers[0]


def test_raw_caller_never_reaches_files_manifests_or_kafka_messages(tmp_path):
    journal = str(tmp_path / "journal")
    config = JournalConfig.resolve(model="fraud", journal_uri=journal, caller_privacy="token")
    ring = Keyring.local_default(config.resolved_privacy_dir())
    finalized = _finalizer(config, ring, "r1").finalize([_call(i, CALLER) for i in range(50)])
    storage = LocalJournalStorage(journal)
    settings = SinkSettings(journal)
    log = settings.manifest(storage, "w-0")
    writer = PartitionFileWriter(storage, "w-0", roll_seconds=3600, roll_bytes=1 << 30,
                                 on_file_written=[manifest_hook(log)])
    for key, batch in split_by_partition(finalized.batch):
        writer.add(key, batch)
    assert writer.roll_all()
    assert log.checkpoint() is not None
    messages = encode_batch(finalized.batch)
    assert len(messages) == 50
    needle = CALLER.encode()
    for message in messages:  # version 1 (JSON) values, still readable
        assert needle not in message.value and CALLER not in repr(message)
    # What the Kafka transport sends and spools today: version 2 values, ZSTD frames, so the
    # needle is looked for in the inflated Arrow stream too, and in a spool frame.
    keys = [b"k%d" % (i % 3) for i in range(finalized.batch.num_rows)]
    v2 = encode_messages(finalized.batch, keys)
    assert sum(m.entries for m in v2) == 50
    for message in v2:
        assert needle not in message.value and CALLER not in repr(message)
        assert needle not in _ipc_stream(message.value).to_pybytes()
        assert CALLER not in repr(decode_message(message.value).to_pylist())
    assert needle not in pack_frame([(m.key, m.value) for m in v2], entries=50)
    scanned = 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            scanned += 1
            assert needle not in path.read_bytes(), f"raw caller in {path}"
    assert scanned >= 4  # data file, manifest record, checkpoint, keyring...


def test_query_finds_a_caller_by_id_in_token_and_plain_journals(tmp_path):
    journal = str(tmp_path / "journal")
    token_cfg = JournalConfig.resolve(model="fraud", journal_uri=journal, caller_privacy="token")
    ring = Keyring.local_default(token_cfg.resolved_privacy_dir())
    calls = [_call(i, CALLER if i % 2 else "svc-b") for i in range(10)]
    tokenized = _finalizer(token_cfg, ring, "r1").finalize(calls[:6]).batch
    plain = _finalizer(token_cfg.with_overrides(caller_privacy="plain"), ring, "r2") \
        .finalize(calls[6:]).batch  # the journal switched modes: both forms are found
    storage = LocalJournalStorage(journal)
    writer = PartitionFileWriter(storage, "w-0", roll_seconds=3600, roll_bytes=1 << 30)
    for batch in (tokenized, plain):
        for key, part in split_by_partition(batch):
            writer.add(key, part)
        writer.roll_all()
    with JournalQuery(storage, caller_tokenizer=caller_tokenizer(journal), actor="inv") as q:
        found = q.find(caller=CALLER)
        assert sorted(found["request_id"].to_pylist()) == ["r1", "r3", "r5", "r7", "r9"]
        token = q.find(caller=CALLER, limit=1)["caller"][0].as_py()
        assert is_caller_token(token)
        assert sorted(q.find(caller=token)["request_id"].to_pylist()) == ["r1", "r3", "r5"]
    log = json.dumps(read_access_log(storage))
    assert CALLER not in log and token in log
    with JournalQuery(storage, actor="inv") as q:  # without a tokenizer: the plain rows only
        assert sorted(q.find(caller=CALLER)["request_id"].to_pylist()) == ["r7", "r9"]


def test_read_tools_never_add_the_key(tmp_path):
    journal = str(tmp_path / "journal")
    privacy = JournalConfig.resolve(model="m", journal_uri=journal).resolved_privacy_dir()
    ring = Keyring.local_default(privacy)
    _drop_caller_key(ring)  # new keyrings start without it; older ones may be copies
    lookup = caller_tokenizer(journal)
    assert lookup(CALLER) is None and lookup("anonymous") == "anonymous"
    assert PURPOSE_CALLER_TOKEN not in json.loads(Path(ring.path).read_text())["purposes"]
    replica = CallerTokenizer(Keyring.local_default(privacy))
    assert replica(CALLER) == caller_tokenizer(journal)(CALLER)  # now it exists


def test_pickles_without_key_bytes(tmp_path):
    ring = Keyring.local_default(tmp_path)
    tokenizer = CallerTokenizer(ring)
    token = tokenizer(CALLER)
    key = ring.purpose_key(PURPOSE_CALLER_TOKEN)
    data = pickle.dumps(tokenizer)
    assert key not in data and key.hex().encode() not in data
    assert pickle.loads(data)(CALLER) == token
    assert key.hex() not in repr(tokenizer)


def _drop_caller_key(ring: Keyring) -> None:
    """Make the keyring look like one written before the caller-token key existed."""
    doc = json.loads(Path(ring.path).read_text())
    doc["purposes"].pop(PURPOSE_CALLER_TOKEN, None)
    Path(ring.path).write_text(json.dumps(doc))


def _replica_token(privacy_dir: str, barrier) -> str:
    config = JournalConfig.resolve(model="fraud", privacy_dir=privacy_dir, caller_privacy="token")
    ring = Keyring.local_default(privacy_dir)
    barrier.wait()
    batch = _finalizer(config, ring, "r").finalize([_call(0, CALLER)]).batch
    return batch.column("caller")[0].as_py()


def test_replicas_in_separate_processes_record_the_same_token(tmp_path):
    privacy = str(tmp_path / "journal-keys")
    _drop_caller_key(Keyring.local_default(privacy))  # the replicas race to add the key
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            tokens = pool.starmap(_replica_token, [(privacy, barrier)] * 3)
    assert len(set(tokens)) == 1 and is_caller_token(tokens[0])
    assert caller_tokenizer(str(tmp_path / "journal"), privacy_dir=privacy)(CALLER) == tokens[0]
