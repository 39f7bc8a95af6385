"""The tokens journal entries carry in place of identities: their formats, and caller tokens.

**Subject tokens** are made from per-subject keys (:mod:`serve_journal.privacy.subjects`, or the
static pseudonymizer): 32 lowercase hexadecimal characters. :func:`check_subject_token` is the
check every public entry point that takes a subject token runs (``JournalQuery.find``, the
console, the CLI, ``count_subject_entries``): a value of another shape is refused with a
:class:`~serve_journal.errors.TokenFormatError` naming the parameter, never echoing the value
(someone may have pasted a raw subject id where a token belongs).

**Caller tokens** (``caller_privacy="token"``): a caller who is the end user is personal data, so
the journal can record ``ct-`` + ``HMAC-SHA256(caller-token key, "caller\\0" || caller)[:32 hex]``
instead of the caller. The key is the keyring's ``caller-token`` purpose key: stable (never
rotated), shared by every replica through the keyring file, and unrelated to any subject key, so a
caller token never equals a subject token (nor does its ``ct-`` form look like one). The
placeholder ``anonymous`` (no caller identity) is kept as it is. Unlike subject tokens, caller
tokens are not crypto-shreddable per caller: anyone holding the keyring and the KEK can test
guessed caller ids.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from typing import Any

from serve_journal.errors import KeyringError, TokenFormatError
from serve_journal.privacy.keyring import PURPOSE_CALLER_TOKEN, Keyring
from serve_journal.privacy.vault import TOKEN_HEX_CHARS

__all__ = [
    "ANONYMOUS_CALLER",
    "CALLER_TOKEN_PREFIX",
    "SUBJECT_TOKEN_FORMAT",
    "CallerTokenizer",
    "TokenFormatError",
    "caller_token",
    "check_subject_token",
    "is_caller_token",
    "is_subject_token",
]

SUBJECT_TOKEN_FORMAT = f"a subject token: {TOKEN_HEX_CHARS} lowercase hexadecimal characters"
_SUBJECT_TOKEN = re.compile(f"[0-9a-f]{{{TOKEN_HEX_CHARS}}}")
CALLER_TOKEN_PREFIX = "ct-"
_CALLER_TOKEN = re.compile(f"{CALLER_TOKEN_PREFIX}[0-9a-f]{{{TOKEN_HEX_CHARS}}}")
ANONYMOUS_CALLER = "anonymous"
"""What the journal records when a call has no caller identity; never tokenized."""
_CALLER_PREFIX = b"caller\0"


def is_subject_token(value: object) -> bool:
    """True when ``value`` has the format of a subject token."""
    return isinstance(value, str) and _SUBJECT_TOKEN.fullmatch(value) is not None


def check_subject_token(value: object, parameter: str = "subject_token") -> str:
    """``value`` when it is a subject token; else :class:`TokenFormatError` naming ``parameter``
    (the value itself is never part of the message)."""
    if not is_subject_token(value):
        raise TokenFormatError(parameter, SUBJECT_TOKEN_FORMAT)
    return value  # type: ignore[return-value]


def is_caller_token(value: object) -> bool:
    """True when ``value`` has the format of a caller token (``ct-`` and 32 hex characters)."""
    return isinstance(value, str) and _CALLER_TOKEN.fullmatch(value) is not None


def caller_token(key: bytes, caller: str) -> str:
    """The caller token of ``caller`` under the ``caller-token`` purpose key ``key``."""
    digest = hmac.digest(key, _CALLER_PREFIX + caller.encode("utf-8", "surrogatepass"),
                         "sha256").hex()
    return CALLER_TOKEN_PREFIX + digest[:TOKEN_HEX_CHARS]


class CallerTokenizer:
    """``caller id -> caller token`` with the keyring's ``caller-token`` key.

    With ``create=True`` (replicas) a keyring that lacks the key gets one (under the keyring's
    file lock, so all replicas agree); with ``create=False`` (read tools) :meth:`__call__`
    returns ``None`` while the journal has never tokenized a caller. Pickling carries the
    keyring's configuration only, never key bytes.
    """

    def __init__(self, keyring: Keyring, *, create: bool = True) -> None:
        self.keyring = keyring
        self.create = create
        self._key: bytes | None = None

    def __repr__(self) -> str:  # never the key
        return f"CallerTokenizer(keyring={self.keyring.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallerTokenizer, (self.keyring,), {"create": self.create})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.create = state["create"]
        self._key = None

    def _current_key(self) -> bytes | None:
        if self._key is None:
            if self.create:
                self._key = self.keyring.purpose_key(PURPOSE_CALLER_TOKEN)
            else:
                self._key = self.keyring.existing_purpose_key(PURPOSE_CALLER_TOKEN)
        return self._key

    def __call__(self, caller: str) -> str | None:
        """The token of ``caller`` (``anonymous`` stays ``anonymous``); ``None`` only when the
        key does not exist and this tokenizer may not create it."""
        if caller == ANONYMOUS_CALLER:
            return caller
        key = self._current_key()
        return None if key is None else caller_token(key, caller)

    def tokenize_many(self, callers: Sequence[str]) -> list[str]:
        """Tokens of a batch of callers (the flusher's column); needs the key to exist or be
        creatable."""
        key = self._current_key()
        if key is None:
            raise KeyringError(f"keyring {self.keyring.path} has no caller-token key")
        cache: dict[str, str] = {}
        out = []
        for caller in callers:
            token = cache.get(caller)
            if token is None:
                token = caller if caller == ANONYMOUS_CALLER else caller_token(key, caller)
                cache[caller] = token
            out.append(token)
        return out
