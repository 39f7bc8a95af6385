"""Every exception type of serve_journal, in one module that imports nothing of the package.

Modules raise these and re-export them where they were first defined (``serve_journal.config.
ConfigError`` is ``serve_journal.errors.ConfigError``), so any module can name an error without
importing the module that raises it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what would be right."""


class JournalUnavailableError(RuntimeError):
    """A high-risk decision was refused because the journal had no room (fail-closed)."""


class TransportError(RuntimeError):
    """A transport could not accept a batch; the caller spools, retries or counts a drop."""


class ModelNotFoundError(LookupError):
    """The configured model (name, alias or version) does not exist in the registry."""


class CanonicalEncodingError(ValueError):
    """A feature value cannot be encoded. The message names the type and path, never the value."""


class ManifestError(RuntimeError):
    """A manifest chain cannot be appended to or read as expected."""


class ChainConflictError(ManifestError):
    """Another writer appended to this chain: every chain must have exactly one writer."""


class CompactionError(RuntimeError):
    """A compacted file does not hold exactly the entries of the files it replaces."""


class RewriteMemoryError(CompactionError):
    """A rewrite could not sort its partition within its memory limit (nothing was written or
    committed); the message says how many rows and which limit, and to raise it."""


class UnrecordedInputError(CompactionError):
    """An input file's bytes match no manifest record: rewriting it would launder a change."""


class RetentionError(ValueError):
    """A retention policy setting is wrong; the message names the field and what would be right."""


class ObjectExistsError(FileExistsError):
    """A create-only write found an object at that path already."""


class VaultError(RuntimeError):
    """The vault cannot be opened or a stored key cannot be unwrapped. Never names a subject."""


class KeyringError(RuntimeError):
    """The keyring or its KEK is missing, malformed, unreadable or refuses to unwrap.

    Messages name files, variables and key ids; never key bytes.
    """


class ForgetIncompleteError(RuntimeError):
    """The key was destroyed and the receipt written, but a configured hook failed."""

    def __init__(self, receipt: Any) -> None:  # a privacy.forget.ForgetReceipt
        failed = sorted(k for k, v in receipt.hooks.items() if v.startswith("failed"))
        super().__init__(f"forget {receipt.receipt_id}: key destroyed, but hook(s) {failed} failed; "
                         "see the receipt and run them again")
        self.receipt = receipt


class CallerRejected(Exception):
    """The caller's token was refused; ``reason`` is one of ``serve_journal.privacy.identity.REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenFormatError(ValueError):
    """A value given as a token (``subject_token=``) does not have a token's format.

    The message names the parameter and the expected format, never the value given.
    """

    def __init__(self, parameter: str, expected: str) -> None:
        super().__init__(f"{parameter} must be {expected}")
        self.parameter = parameter


class ReplayDataError(ValueError):
    """Replay could not use the features (or ids) it read: the message names the stage, the entry's
    position or path and the types involved, never a feature value or a subject id."""


class WireFormatError(ValueError):
    """A message is not a journal entry this version can read (the payload is never quoted)."""


class SpoolInUseError(ValueError):
    """The spool directory is locked by another live spool (process or object)."""


class ArchivedObjectError(RuntimeError):
    """Journal files sit in an archive storage class (S3 GLACIER / DEEP_ARCHIVE, not restored):
    they cannot be read until restored. ``paths`` are relative to the journal root and
    ``restore_command`` is the command that restores them (S3 RestoreObject)."""

    def __init__(self, paths: Any, restore_command: str) -> None:
        self.paths = tuple(sorted(paths))
        self.restore_command = restore_command
        shown = ", ".join(self.paths[:3]) + (f" and {len(self.paths) - 3} more"
                                             if len(self.paths) > 3 else "")
        super().__init__(f"restore needed: {len(self.paths)} archived journal file(s) cannot be "
                         f"read until restored ({shown}); run: {restore_command}")
