"""Integrity: the byte contract entries are hashed on, and the proofs built on it.

- ``encoding.py``: the canonical feature encoding (the one definition, plus its fast and Arrow
  column-wise forms, byte-identical to it).
- ``merkle.py``: RFC 6962 Merkle trees over a journal file's entries and their proofs.
- ``manifest.py``: signed manifest records and checkpoints holding each file's Merkle root.
- ``fingerprint.py``: file fingerprints.

The encoding is re-exported here; import the other modules by name.
"""

from serve_journal.integrity.encoding import (
    MAX_DEPTH,
    CanonicalEncodingError,
    canonical_encode,
    canonical_encode_fast,
    encode_arrow_rows,
    encode_arrow_values,
    encode_flat_mapping,
)

__all__ = [
    "MAX_DEPTH",
    "CanonicalEncodingError",
    "canonical_encode",
    "canonical_encode_fast",
    "encode_arrow_rows",
    "encode_arrow_values",
    "encode_flat_mapping",
]
