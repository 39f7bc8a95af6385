"""Privacy: canonical feature encoding, keys, subject tokens, crypto-shredding, caller identity.

See docs/security.md for the threat model, the encoding specification and the key hierarchy.
"""

from serve_journal.integrity.encoding import CanonicalEncodingError, canonical_encode
from serve_journal.privacy.forget import (
    ForgetEvent,
    ForgetIncompleteError,
    ForgetReceipt,
    count_subject_entries,
    forget,
    forget_subject,
)
from serve_journal.privacy.identity import CallerRejected, JwtVerifier
from serve_journal.privacy.keyring import (
    KEK_ENV,
    EnvKek,
    FileKek,
    Keyring,
    KeyringError,
    KeyWrapper,
    StaticKek,
)
from serve_journal.privacy.pseudonymizer import Protected, Pseudonymizer, StaticKeyPseudonymizer
from serve_journal.privacy.subjects import VaultPseudonymizer, VerifyStatus, features_hmac
from serve_journal.privacy.tokens import CallerTokenizer, TokenFormatError, check_subject_token
from serve_journal.privacy.vault import SubjectKey, SubjectVault, VaultError

__all__ = [
    "KEK_ENV",
    "CallerRejected",
    "CallerTokenizer",
    "CanonicalEncodingError",
    "EnvKek",
    "FileKek",
    "ForgetEvent",
    "ForgetIncompleteError",
    "ForgetReceipt",
    "JwtVerifier",
    "KeyWrapper",
    "Keyring",
    "KeyringError",
    "Protected",
    "Pseudonymizer",
    "StaticKek",
    "StaticKeyPseudonymizer",
    "SubjectKey",
    "SubjectVault",
    "TokenFormatError",
    "VaultError",
    "VaultPseudonymizer",
    "VerifyStatus",
    "canonical_encode",
    "check_subject_token",
    "count_subject_entries",
    "features_hmac",
    "forget",
    "forget_subject",
]
