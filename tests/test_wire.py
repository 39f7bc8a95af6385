"""The Kafka wire format: exact round trip, versioned headers, malformed input refused."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal.schema import COLUMN_NAMES, ENTRY_SCHEMA
from serve_journal.transport import wire
from tests.fixtures.kafka import make_entries


def _round_trip(batch: pa.RecordBatch) -> pa.Table:
    messages = wire.encode_batch(batch)
    assert len(messages) == batch.num_rows
    return wire.decode_values(m.value for m in messages)


def _round_trip_v2(batch: pa.RecordBatch, keys: list[bytes], **kwargs) -> pa.Table:
    messages = wire.encode_messages(batch, keys, **kwargs)
    assert sum(m.entries for m in messages) == batch.num_rows
    tables = [wire.decode_message(m.value) for m in messages]
    assert [t.num_rows for t in tables] == [m.entries for m in messages]
    return pa.concat_tables(tables)


def test_round_trip_is_exact_with_nulls_and_lists():
    batch = make_entries(50, nulls=True)
    table = _round_trip(batch)
    assert table.schema == ENTRY_SCHEMA
    assert table.equals(pa.Table.from_batches([batch]))
    # nulls really were present and really came back
    assert table.column("score").null_count > 0
    assert table.column("outputs").null_count > 0


def test_value_is_plain_json_readable_by_any_consumer():
    batch = make_entries(1, nulls=False)
    (message,) = wire.encode_batch(batch)
    record = json.loads(message.value)
    assert list(record) == list(COLUMN_NAMES)
    assert record["ts"] == batch.column("ts").cast(pa.int64())[0].as_py()
    assert record["outputs"][0] == {"label": "fraud", "score": 0.0}
    assert b" " not in message.value.split(b'"caller"')[0]  # compact separators
    assert message.model_name == "fraud" and message.request_id == "replica-a-0"
    headers = dict(wire.JSON_HEADERS)
    assert headers[wire.SCHEMA_VERSION_HEADER] == b"3"
    assert headers[wire.WIRE_VERSION_HEADER] == b"1"
    assert headers["content-type"] == b"application/json"


def test_non_finite_floats_travel_as_strings():
    batch = make_entries(3, nulls=False).to_pydict()
    batch["score"] = [math.nan, math.inf, -math.inf]
    batch["outputs"] = [[{"label": "x", "score": math.nan}], [], None]
    rb = pa.RecordBatch.from_pydict(batch, schema=ENTRY_SCHEMA)
    values = [m.value for m in wire.encode_batch(rb)]
    assert json.loads(values[1])["score"] == "Infinity"
    table = wire.decode_values(values)
    scores = table.column("score").to_pylist()
    assert math.isnan(scores[0]) and scores[1] == math.inf and scores[2] == -math.inf
    assert math.isnan(table.column("outputs")[0].as_py()[0]["score"])
    assert table.column("outputs")[1].as_py() == []


_text = st.text(max_size=12)
_opt_float = st.one_of(st.none(), st.floats(allow_nan=False, width=64))


@settings(max_examples=60, deadline=None)
@given(
    subject=st.one_of(st.none(), _text),
    caller=_text,
    model=_text,
    score=_opt_float,
    latency=st.floats(allow_nan=False, allow_infinity=False, width=32),
    outputs=st.one_of(st.none(), st.lists(st.fixed_dictionaries(
        {"label": st.one_of(st.none(), _text), "score": _opt_float}), max_size=3)),
    ts=st.integers(min_value=0, max_value=2**62),
    seq=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_round_trip_property(subject, caller, model, score, latency, outputs, ts, seq):
    data = make_entries(1, nulls=False).to_pydict()
    data.update(subject_token=[subject], caller=[caller], model_name=[model], score=[score],
                latency_ms=[latency], outputs=[outputs], ts=[ts], seq=[seq])
    batch = pa.RecordBatch.from_pydict(data, schema=ENTRY_SCHEMA)
    expected = pa.Table.from_batches([batch])
    assert _round_trip(batch).equals(expected)
    assert _round_trip_v2(batch, [b"k"]).equals(expected)
    # The bulk decoder gives the same table, or declines (never a different table).
    fast = wire.decode_values_fast([m.value for m in wire.encode_batch(batch)])
    floats = [score, *(o["score"] for o in outputs or [])]
    if all(f is None or math.isfinite(f) for f in floats):
        assert fast is not None and fast.equals(expected)
    else:
        assert fast is None  # "Infinity" is a string: the per-message path decodes it


def test_bulk_decoder_matches_the_per_message_decoder():
    values = [m.value for m in wire.encode_batch(make_entries(2_000, nulls=True))]
    fast = wire.decode_values_fast(values)
    assert fast is not None and fast.equals(wire.decode_values(values))
    assert fast.schema == ENTRY_SCHEMA


def test_absent_nullable_columns_read_as_null_absent_required_ones_refuse():
    record = json.loads(wire.encode_batch(make_entries(1, nulls=False))[0].value)
    del record["explanation_ref"], record["subject_token"]
    record["added_in_a_later_version"] = 1  # unknown keys are ignored
    value = json.dumps(record).encode()
    slow = wire.decode_values([value])
    assert slow.column("subject_token").to_pylist() == [None]
    assert wire.decode_values_fast([value]).equals(slow)
    del record["seq"]
    value = json.dumps(record).encode()
    with pytest.raises(wire.WireFormatError, match="lacks entry column"):
        wire.decode_value(value)
    assert wire.decode_values_fast([value]) is None


@pytest.mark.parametrize(("bad", "readable"), [
    (b'{"schema_version": 1', False),  # not JSON
    (b"[1, 2]", False),  # not an object
    (b"", False),  # empty
    ("seq as text", False),  # a type that does not fit the schema
    ("two objects", False),  # two objects in one value
    ("pretty", True),  # one valid entry over several lines: the per-message path reads it
])
def test_a_chunk_with_one_bad_message_keeps_the_others(bad, readable):
    from serve_journal.sink.kafka import build_chunk_parts

    values = [m.value for m in wire.encode_batch(make_entries(20, nulls=False))]
    record = json.loads(values[5])
    if bad == "seq as text":
        bad = json.dumps({**record, "seq": "five"}).encode()
    elif bad == "two objects":
        bad = values[5] + b"\n" + values[6]
    elif bad == "pretty":
        bad = json.dumps(record, indent=2).encode()
    values[5] = bad
    messages = [(offset, value, wire.JSON_HEADERS) for offset, value in enumerate(values)]
    parts, stats = build_chunk_parts("journal", 0, messages)
    seqs = sorted(seq for part in parts for seq in part.table.column("seq").to_pylist())
    if readable:
        assert stats["undecodable"] == 0 and seqs == list(range(20))
    else:  # skipped and counted; the 19 others are written, not held back by the bad one
        assert stats["undecodable"] == 1 and seqs == [s for s in range(20) if s != 5]


# -- wire version 2: Arrow IPC, several entries a message -------------------------------------


def test_v2_round_trip_is_exact_with_nulls_and_non_finite_floats():
    data = make_entries(300, nulls=True).to_pydict()
    data["score"][1:4] = [math.nan, math.inf, -math.inf]
    batch = pa.RecordBatch.from_pydict(data, schema=ENTRY_SCHEMA)
    table = _round_trip_v2(batch, [b"k"] * 300)
    assert table.schema == ENTRY_SCHEMA
    expected = pa.Table.from_batches([batch])
    assert table.drop_columns(["score"]).equals(expected.drop_columns(["score"]))
    scores = table.column("score").to_pylist()
    assert [repr(v) for v in scores] == [repr(v) for v in expected.column("score").to_pylist()]
    assert math.isnan(scores[1]) and scores[2] == math.inf and scores[3] == -math.inf
    headers = dict(wire.HEADERS)
    assert headers[wire.WIRE_VERSION_HEADER] == b"2"
    assert headers["content-type"] == b"application/vnd.serve-journal.arrow-stream+zstd"
    assert wire.check_headers(wire.HEADERS) == 2 and wire.check_headers(wire.JSON_HEADERS) == 1


def test_v2_groups_rows_by_key_in_order_and_is_deterministic():
    batch = make_entries(1_000, nulls=True)
    keys = [f"fraud|0|{i % 3}".encode() for i in range(1_000)]
    messages = wire.encode_messages(batch, keys)
    assert [m.key for m in messages] == [b"fraud|0|0", b"fraud|0|1", b"fraud|0|2"]
    for shard, message in enumerate(messages):
        seqs = wire.decode_message(message.value).column("seq").to_pylist()
        assert seqs == [s for s in range(1_000) if s % 3 == shard]  # row order kept within a key
    again = wire.encode_messages(batch, keys)
    assert [m.value for m in again] == [m.value for m in messages]  # same rows, same bytes
    with pytest.raises(ValueError, match="one key per row"):
        wire.encode_messages(batch, keys[:-1])


def test_v2_messages_are_bounded():
    batch = make_entries(5_000, nulls=False)
    messages = wire.encode_messages(batch, [b"k"] * 5_000, max_bytes=16 * 1024)
    assert len(messages) > 4
    assert all(len(m.value) <= 16 * 1024 for m in messages)
    table = pa.concat_tables(wire.decode_message(m.value) for m in messages)
    assert table.equals(pa.Table.from_batches([batch]))
    (alone,) = wire.encode_messages(make_entries(1), [b"k"], max_bytes=10)
    assert alone.entries == 1  # one entry larger than the bound is a message of its own


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _v2_bad(kind: str, good: bytes) -> bytes:
    table = pa.Table.from_batches([make_entries(3, start_seq=900)])
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "random":
        return bytes(range(256)) * 4
    if kind == "json":
        return wire.encode_batch(make_entries(1))[0].value
    if kind == "other schema":
        return _ipc(pa.table({"seq": [1, 2]}))
    if kind == "null required":
        seq = table.column("seq").to_pylist()
        return _ipc(table.set_column(table.schema.get_field_index("seq"), "seq",
                                     pa.array([None] + seq[1:], type=pa.int64())))
    if kind == "empty":
        return b""
    if kind == "bomb":  # declares 4 GiB: refused before anything is inflated
        return wire.MAGIC + (2**32 - 1).to_bytes(4, "big") + good[8:]
    if kind == "wrong length":
        return wire.MAGIC + (int.from_bytes(good[4:8], "big") + 1).to_bytes(4, "big") + good[8:]
    if kind == "short envelope":
        return wire.MAGIC + b"\x00"
    if kind == "bad frame":
        return good[:8] + bytes(reversed(good[8:]))
    raise AssertionError(kind)


def test_v2_values_are_one_zstd_frame_of_a_stream_small_for_few_entries():
    (one,) = wire.encode_messages(make_entries(1, nulls=False), [b"k"])
    assert one.value.startswith(wire.MAGIC) and len(one.value) < 2_000
    assert one.value[8:12] == b"\x28\xb5\x2f\xfd"  # a standard ZSTD frame
    # A bare Arrow IPC stream (what buffer-compressing writers produce) is read too.
    table = pa.Table.from_batches([make_entries(3, nulls=True)])
    assert wire.decode_message(_ipc(table)).equals(table)


@pytest.mark.parametrize("kind", ["truncated", "random", "json", "other schema", "null required", "empty",
                                  "bomb", "wrong length", "short envelope", "bad frame"])
def test_a_bad_v2_message_is_refused_whole_and_the_chunk_keeps_the_others(kind):
    from serve_journal.sink.kafka import build_chunk_parts

    batch = make_entries(40, nulls=True)
    values = [m.value for m in wire.encode_messages(batch, [str(i // 10).encode() for i in range(40)])]
    assert len(values) == 4
    bad = _v2_bad(kind, values[1])
    with pytest.raises(wire.WireFormatError) as info:
        wire.decode_message(bad)
    assert "replica" not in str(info.value)  # names the failure, never a value
    values[1] = bad
    messages = [(offset, value, wire.HEADERS) for offset, value in enumerate(values)]
    parts, stats = build_chunk_parts("journal", 0, messages)
    seqs = sorted(seq for part in parts for seq in part.table.column("seq").to_pylist())
    assert stats["undecodable"] == 1 and seqs == [s for s in range(40) if not 10 <= s < 20]


def test_a_chunk_of_v1_and_v2_messages_decodes_in_offset_order():
    from serve_journal.sink.kafka import build_chunk_parts

    old = [(m.value, wire.JSON_HEADERS) for m in wire.encode_batch(make_entries(5, start_seq=0))]
    new = [(m.value, wire.HEADERS) for m in wire.encode_messages(make_entries(5, start_seq=5), [b"k"] * 5)]
    older = [(m.value, wire.JSON_HEADERS) for m in wire.encode_batch(make_entries(5, start_seq=10))]
    messages = [(offset, v, h) for offset, (v, h) in enumerate(old + new + older)]
    parts, stats = build_chunk_parts("journal", 0, messages)
    assert stats == {"undecodable": 0, "duplicates": 0}
    seqs = [seq for part in parts for seq in part.table.column("seq").to_pylist()]
    assert seqs == list(range(15))
    assert parts[0].name.start == 0 and parts[0].name.end == 10  # offsets of messages, not entries
    unknown = [(0, new[0][0], ((wire.WIRE_VERSION_HEADER, b"3"), (wire.SCHEMA_VERSION_HEADER, b"2")))]
    with pytest.raises(wire.WireFormatError):
        wire.check_headers(unknown[0][2])


def test_frames_of_both_versions():
    pairs = [(b"k1", b"v1"), (b"k2", b"value two")]
    frame = wire.pack_frame(pairs, entries=700)
    assert wire.frame_length(frame) == 700
    read = wire.read_frame(frame)
    assert (read.version, read.messages, read.entries) == (2, pairs, 700)
    old = wire.pack_frame(pairs, version=1)  # what the previous release spooled
    assert old[:4] == b"SJF1" and old[4:8] == b"\x00\x00\x00\x01"
    assert wire.frame_length(old) == 2
    assert wire.read_frame(old) == wire.Frame(1, pairs, 2)
    assert wire.unpack_frame(old) == pairs
    with pytest.raises(ValueError):
        wire.pack_frame(pairs)  # a v2 frame must say how many entries it carries
    for broken in (frame[:-1], frame + b"x", frame[:14], b"SJF1" + b"\x00\x00\x00\x03" + frame[8:]):
        with pytest.raises(wire.WireFormatError):
            wire.read_frame(broken)


def test_the_actor_paths_arrow_stream_round_trips_exactly_as_bytes_or_buffer():
    """What the actor transport hands a writer (``bytes`` or the ``pa.Buffer``) is read back
    as the same batch, nulls and non-finite floats included; a stream of several batches is
    one batch."""
    data = make_entries(300, nulls=True).to_pydict()
    data["score"][1:3] = [math.nan, math.inf]
    batch = pa.RecordBatch.from_pydict(data, schema=ENTRY_SCHEMA)
    stream = wire.arrow_stream(batch)
    for value in (stream, bytes(stream)):
        back = wire.read_arrow_stream(value)
        assert back.schema == ENTRY_SCHEMA and back.num_rows == 300
        assert [repr(v) for v in back.column("score").to_pylist()] == \
            [repr(v) for v in batch.column("score").to_pylist()]
        assert back.drop_columns(["score"]).equals(batch.drop_columns(["score"]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ENTRY_SCHEMA) as writer:
        writer.write_batch(batch.slice(0, 100))
        writer.write_batch(batch.slice(100))
    assert wire.read_arrow_stream(sink.getvalue()).num_rows == 300
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, ENTRY_SCHEMA).close()
    assert wire.read_arrow_stream(sink.getvalue()).num_rows == 0
