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
    headers = dict(wire.HEADERS)
    assert headers[wire.SCHEMA_VERSION_HEADER] == b"2"
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
    messages = [(offset, value, wire.HEADERS) for offset, value in enumerate(values)]
    parts, stats = build_chunk_parts("journal", 0, messages)
    seqs = sorted(seq for part in parts for seq in part.table.column("seq").to_pylist())
    if readable:
        assert stats["undecodable"] == 0 and seqs == list(range(20))
    else:  # skipped and counted; the 19 others are written, not held back by the bad one
        assert stats["undecodable"] == 1 and seqs == [s for s in range(20) if s != 5]
