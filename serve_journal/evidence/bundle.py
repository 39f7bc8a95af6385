"""The evidence bundle's layout: which members a bundle holds, what each proves, and the
README-style manifest listing them with their SHA-256.

Shared by the exporter (:mod:`serve_journal.evidence.export`) and the offline verifier
(:mod:`serve_journal.evidence.verify`); standard library only, so the verifier's dependencies stay
the integrity primitives. The manifest (``README.txt``) is a pure function of the other members'
names and bytes (:func:`render_manifest`): the verifier renders it again and compares bytes, so
a single changed byte in it, or in any member it lists, is found.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

BUNDLE_FORMAT = 1
"""Version of the bundle layout (``evidence.json`` ``format``, first line of ``README.txt``)."""

MANIFEST = "README.txt"
EVIDENCE = "evidence.json"
KEY = "key.json"
ENTRIES = "entries.parquet"
PROOFS = "proofs.json"
VERIFY_JSON = "verify-summary.json"
VERIFY_TEXT = "verify-summary.txt"
RECORDS_DIR = "records"
CHECKPOINTS_DIR = "checkpoints"

FIXED_MEMBERS = (EVIDENCE, KEY, ENTRIES, PROOFS, VERIFY_JSON, VERIFY_TEXT)
"""The members every bundle holds besides ``README.txt`` and its records and checkpoints."""

_OBJECT = r"[A-Za-z0-9_.\-]{1,128}/\d{12}\.json"
RECORD_NAME = re.compile(rf"^{RECORDS_DIR}/({_OBJECT})$")
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINTS_DIR}/({_OBJECT})$")

ROLES: Mapping[str, str] = {
    EVIDENCE: "what was exported, when, by whom, for which selection (tokens only); which file, "
              "manifest record and checkpoints each entry is proven against. The exporter's "
              "statement: not signed",
    KEY: "SHA-256 fingerprint and key id of the Ed25519 key the checkpoints are signed with; "
         "compare it with the key you hold (verify-evidence --public-key)",
    ENTRIES: "the selected journal entries exactly as stored (subject tokens and feature HMACs, "
             "never raw values): their leaves are what the inclusion proofs prove",
    PROOFS: "per entry: its file, its index in the file, the file's entry count and the RFC 6962 "
            "inclusion proof (audit path) to the Merkle root in the file's manifest record",
    VERIFY_JSON: "the exporter's verify run over the journal (or the files involved), read-only: "
                 "completeness and sequence checks the bundle alone cannot make. Not signed",
    VERIFY_TEXT: "the same verify run as text",
}
RECORD_ROLE = ("manifest record as stored: the file's SHA-256 and Merkle root, hash-chained to "
               "the previous record (prev_hash) so the signed checkpoint covers it")
CHECKPOINT_ROLE = ("Ed25519-signed checkpoint (chain, length, head hash): the covering one signs "
                   "the chain up to the entries' records, the latest one the chain as it is now; "
                   "the records between them are the consistency proof")


def role_of(name: str) -> str | None:
    """What member ``name`` proves, or ``None`` for a name a bundle never holds."""
    if name in ROLES:
        return ROLES[name]
    if RECORD_NAME.match(name):
        return RECORD_ROLE
    if CHECKPOINT_NAME.match(name):
        return CHECKPOINT_ROLE
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_manifest(digests: Mapping[str, str]) -> bytes:
    """``README.txt`` of a bundle whose other members have SHA-256 ``digests`` (name -> hex).

    One line per member, sorted by name: ``<sha256>  <name>`` and, indented below it, what the
    member proves. Check a member by hand with ``sha256sum`` after ``unzip``.
    """
    lines = [
        f"serve_journal evidence bundle, format {BUNDLE_FORMAT}",
        "",
        "Check it offline: serve-journal verify-evidence BUNDLE.zip --public-key YOUR_COPY.pem",
        "(exit code 0 only when every proof holds). Each member below is listed with its SHA-256",
        "and what it proves. docs/evidence.md explains the bundle and what it does not prove.",
        "",
    ]
    for name in sorted(digests):
        lines.append(f"{digests[name]}  {name}")
        lines.append(f"    {role_of(name) or 'not a member of an evidence bundle'}")
    return ("\n".join(lines) + "\n").encode("utf-8")


_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$")


def parse_manifest(data: bytes) -> dict[str, str]:
    """``{name: sha256}`` listed in a ``README.txt`` (lines that are not listings are ignored:
    the verifier renders the whole manifest again and compares bytes)."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        match = _MANIFEST_LINE.match(line)
        if match:
            out[match.group(2)] = match.group(1)
    return out


def unsafe_name(name: str) -> bool:
    """A zip member name that could leave a folder it were extracted to, or hide as another
    name: absolute, a drive, ``..`` or empty segments, backslashes, control characters."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return True
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))
