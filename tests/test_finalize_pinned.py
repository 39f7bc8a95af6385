"""The finalizer's output is pinned: a fixed batch of captured calls, fixed keys, fixed policy.

The digests below were computed from the finalizer as it was before its batched rewrite (issue
17): any change to an entry's bytes (a token, a feature HMAC, a canonical encoding, a parsed
body, a column's type or order, which calls are kept) changes them. With the vault's random
per-subject keys the tokens cannot be pinned, so that path is checked against its definition
(docs/security.md, "Key hierarchy") and against the per-call :meth:`protect`.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest

from serve_journal._private.entries import CapturedCall, EntryFinalizer, ReplicaIdentity
from serve_journal.config import JournalConfig
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.policy import default_policy
from serve_journal.privacy.keyring import FileKek, Keyring
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.privacy.subjects import VaultPseudonymizer, features_hmac
from serve_journal.privacy.vault import SubjectVault
from serve_journal.registry import ModelInfo
from serve_journal.sampling import Sampler
from serve_journal.schema import ENTRY_SCHEMA

MODEL = ModelInfo("fraud", "3", "sha256:ab", "tag")
T0 = 1_700_000_000_000_000


def _scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "headers": [(b"content-type", b"application/json"), *headers]}


class _Response:
    """What a Starlette response looks like to the finalizer: a status code and a JSON body."""

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.body = body


def _bodies() -> list[tuple[bytes | None, object]]:
    """(request body, result) pairs covering every parsing and encoding branch."""
    out: list[tuple[bytes | None, object]] = []
    for i in range(300):
        features = {"amount": round(10.5 + i * 1.37, 2), "hour": i % 24, "merchant_risk": (i % 97) / 97,
                    "distance_km": i * 0.125, "card_age_days": i * 11 - 400, "foreign": i % 2,
                    "country": ["DE", "FR", "Zoë", ""][i % 4], "flag": [True, False, None][i % 3]}
        body = json.dumps({"subject_id": f"user-{i % 37:04d}", "features": features}).encode()
        score = (i * 37 % 100) / 100
        out.append((body, {"score": score, "decision": "block" if score >= 0.9 else None}))
    out += [
        (b'{"subject_id": "big", "features": {"n": 123456789012345678901234567890, "m": -1}}',
         {"score": 0.5}),
        (b'{"subject_id": "nan", "features": {"x": NaN, "y": Infinity, "z": -Infinity}}',
         {"scores": {"a": 0.1, "b": float("nan"), "c": 0.7}}),
        (b'{"subject_id": "nested", "features": {"v": [1, 2.5, "x", null], "m": {"k": [true]}}}',
         {"outputs": [{"label": "x", "score": 0.3}, {"label": "y"}]}),
        (b'{"features": {"no_subject": 1}}', 0.42),
        (b'{"subject_id": 17, "x": 1, "y": "rest of the body is the features"}', {"score": "0.8"}),
        (b"not json at all", None),
        (b"", {"score": 0.2}),
        (b'[1, 2, 3]', [0.1]),
        (b'{"subject_id": "lone \\ud800", "features": {"s": "\\udc00"}}', {"score": 0.1}),
        (b'\xef\xbb\xbf{"subject_id": "bom", "features": {"a": 1}}', {"score": 0.95}),
        (b'{"subject_id": "ints", "features": {"a": 0, "b": 127, "c": 128, "d": -128, "e": -129, '
         b'"f": 255, "g": 256, "h": 9223372036854775807, "i": -9223372036854775808}}', {"score": 0.33}),
    ]
    return out


def _calls() -> list[CapturedCall]:
    calls = []
    for i, (body, result) in enumerate(_bodies()):
        scope = _scope((b"x-caller-id", f"svc-{i % 5}".encode()))
        annotations = None
        if i % 41 == 7:
            annotations = {"subject": f"ann-{i}", "features": {"annotated": i}, "caller": "annotated",
                           "explanation_ref": f"ex-{i}", "threshold": 0.4}
        outcome, error = ("ok", None) if i % 29 else ("error", "ValueError")
        if i % 53 == 11:  # a handle call: the first argument is the body
            calls.append(CapturedCall(i, T0 + i, f"{i:032x}", ({"subject_id": f"h-{i}", "features": {"h": i}},),
                                      {}, None, None, result, outcome, error, 1.5, annotations, MODEL))
            continue
        resp = _Response(json.dumps(result).encode()) if i % 7 == 3 and result is not None else result
        calls.append(CapturedCall(i, T0 + i, f"{i:032x}", (), {}, scope, body, resp, outcome, error,
                                  float(i % 13), annotations, MODEL))
    return calls


def _finalizer(pseudonymizer) -> EntryFinalizer:
    cfg = JournalConfig.resolve(model="fraud", threshold=0.75)
    return EntryFinalizer(cfg, pseudonymizer, ReplicaIdentity("p1", "app", "Dep", "rep"),
                          Sampler(default_policy(low_rate=0.5), b"s" * 32))


def _digest(finalized) -> str:
    rows = pa.Table.from_batches([finalized.batch]).to_pylist()
    doc = {"schema": str(finalized.batch.schema), "rows": rows, "decisions": finalized.decisions,
           "tiers": finalized.tiers, "rates": finalized.rates, "outcomes": finalized.outcomes,
           "keep": finalized.keep, "models": [m.name for m in finalized.models]}
    return hashlib.sha256(_text(doc).encode()).hexdigest()


def _text(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=repr, allow_nan=True)


PINNED = "b2c1d6a0aa499de12efcb5abda556dfce80cb170107e72b710dce8be4b14b7cd"


def test_the_static_key_batch_is_pinned():
    finalizer = _finalizer(StaticKeyPseudonymizer("k1", b"k" * 32))
    calls = _calls()
    first = finalizer.finalize(calls)
    assert first.batch.schema == ENTRY_SCHEMA
    assert 0 < first.batch.num_rows < len(calls)  # sampling kept a strict subset
    assert finalizer.unencodable_features == 1  # the lone surrogate
    assert _digest(first) == PINNED
    # In two batches, and again (warm caches): the same entries.
    halves = [finalizer.finalize(calls[:150]), finalizer.finalize(calls[150:])]
    rows = [r for h in halves for r in pa.Table.from_batches([h.batch]).to_pylist()]
    assert _text(rows) == _text(pa.Table.from_batches([first.batch]).to_pylist())
    assert _digest(finalizer.finalize(calls)) == PINNED


@pytest.fixture
def vault_pseudonymizer(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    ring = Keyring(keys / "ring.json", FileKek.create(keys / "kek"))
    vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", ring)
    return VaultPseudonymizer(ring, vault)


def test_vault_tokens_and_hmacs_follow_their_definition(vault_pseudonymizer):
    pseudo = vault_pseudonymizer
    finalizer = _finalizer(pseudo)
    calls = _calls()
    rows = pa.Table.from_batches([finalizer.finalize(calls).batch]).to_pylist()
    static = pa.Table.from_batches(
        [_finalizer(StaticKeyPseudonymizer("k1", b"k" * 32)).finalize(calls).batch]).to_pylist()
    assert len(rows) == len(static)
    data_key = pseudo.keyring.data_key(pseudo.keyring.current_key_id)
    checked = 0
    for row, ref in zip(rows, static, strict=True):
        for name in ENTRY_SCHEMA.names:
            if name not in ("subject_token", "features_hmac", "key_id"):
                assert _text(row[name]) == _text(ref[name]), name
        assert row["key_id"] == pseudo.keyring.current_key_id
        assert (row["subject_token"] is None) == (ref["subject_token"] is None)
        if row["subject_token"] is None:
            continue
        key = pseudo.vault.get_by_tokens([row["subject_token"]])[row["subject_token"]]
        if row["features_hmac"] is not None:
            seq = row["seq"]
            call = calls[seq]
            body = call.args[0] if call.scope is None else json.loads(call.body)
            if not isinstance(body, dict):
                continue
            features = (call.annotations or {}).get("features", body.get("features"))
            if features is None:
                features = {k: v for k, v in body.items() if k != "subject_id"}
            expected = features_hmac(canonical_encode(features), data_key, key.key)
            assert row["features_hmac"] == expected
            checked += 1
    assert checked > 50
    # The per-call protocol agrees with what the batch wrote, on a warm cache.
    again = pa.Table.from_batches([finalizer.finalize(calls).batch]).to_pylist()
    assert [r["subject_token"] for r in again] == [r["subject_token"] for r in rows]
    assert [r["features_hmac"] for r in again] == [r["features_hmac"] for r in rows]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_subject_cache_never_serves_a_forgotten_or_expired_token(tmp_path):
    """Attacker's view: a subject is forgotten (or its key ages out) while a replica has its
    token cached by raw id; the replica must never write the old token again."""
    keys = tmp_path / "keys"
    keys.mkdir()
    ring = Keyring(keys / "ring.json", FileKek.create(keys / "kek"))
    clock = _Clock()
    replica = VaultPseudonymizer(ring, SubjectVault.sqlite(tmp_path / "v.sqlite3", ring),
                                 max_key_age_s=30, clock=clock)
    enc = canonical_encode({"x": 1})
    old = replica.protect_columns(["alice", "bob", "alice"], [enc, None, enc])
    assert old[0][0] == old[0][2] and old[0][1] != old[0][0]
    assert replica.protect_columns(["alice"], [enc])[0] == [old[0][0]]  # served from the cache
    # Forgotten by another process: once the tombstone is seen, alice gets a fresh key.
    SubjectVault.sqlite(tmp_path / "v.sqlite3", ring).forget("alice")
    assert replica.refresh_invalidations() == 1
    assert "alice" not in replica._by_subject and "bob" in replica._by_subject
    fresh = replica.protect_columns(["alice"], [enc])
    assert fresh[0] != [old[0][0]] and fresh[1] != [old[1][0]]
    # Aged out: read again from the vault (same key, no forget), and dropped from the id map.
    clock.now += 31
    replica.expire()
    assert replica._by_subject == {} and replica.cached_subjects() == 0
    assert replica.protect_columns(["bob"], [None])[0] == [old[0][1]]
    # The raw ids live in memory only: not in the repr, not in a pickle, not in a cache entry's repr.
    import pickle  # inside: only this test pickles

    assert "bob" not in repr(replica) and b"bob" not in pickle.dumps(replica)
    assert all("bob" not in repr(entry) for entry in replica._cache.values())
