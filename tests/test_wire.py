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
    assert headers[wire.SCHEMA_VERSION_HEADER] == b"1"
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
    assert _round_trip(batch).equals(pa.Table.from_batches([batch]))


def test_headers_with_unknown_versions_are_refused():
    wire.check_headers(wire.HEADERS)
    with pytest.raises(wire.WireFormatError, match="schema_version"):
        wire.check_headers([(wire.SCHEMA_VERSION_HEADER, b"99"), (wire.WIRE_VERSION_HEADER, b"1")])
    with pytest.raises(wire.WireFormatError, match="wire_version"):
        wire.check_headers([(wire.SCHEMA_VERSION_HEADER, b"1")])


def test_malformed_values_are_refused_without_quoting_them():
    with pytest.raises(wire.WireFormatError) as info:
        wire.decode_value(b'{"secret-subject-123": 1')
    assert "secret-subject-123" not in str(info.value)
    with pytest.raises(wire.WireFormatError, match="lacks entry column"):
        wire.decode_value(b"{}")


def test_frame_round_trip_and_truncation():
    pairs = [(b"fraud|1|0", b'{"a":1}'), (b"", b""), (b"k" * 300, b"v" * 70_000)]
    frame = wire.pack_frame(pairs)
    assert wire.unpack_frame(frame) == pairs
    with pytest.raises(wire.WireFormatError):
        wire.unpack_frame(frame[:-1])
    with pytest.raises(wire.WireFormatError):
        wire.unpack_frame(frame + b"x")
