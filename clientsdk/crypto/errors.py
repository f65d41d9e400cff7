"""Errors of the crypto core.  Each has a stable ``code`` (documented in PROTOCOL.md).

Failures an attacker can trigger after decryption collapse into one class per
layer (``DecryptionFailed``, ``BackupInvalid``, ``AttachmentInvalid``) and carry
no detail: the precise reason goes to local debug logs only (cryptography's
``InvalidToken`` lesson).  Messages never contain key material or plaintext.

    CryptoError
    ├── InvalidKey            wrong length, small-order or otherwise unusable public key
    ├── MalformedMessage      bytes that do not parse as the expected message/state
    │   └── UnknownPrekey     an initial message naming a prekey this device does not hold
    ├── DecryptionFailed      authentication failed; state untouched
    ├── ReplayedMessage       a message (or initial message) seen before
    ├── TooManySkipped        a gap larger than MAX_SKIP (a full skipped-key store evicts the oldest)
    ├── UnsupportedVersion    a serialised state/backup with an unknown version
    ├── BackupInvalid         wrong recovery key / passphrase, or tampered backup
    ├── RecoveryKeyMistyped   a typed recovery key that fails its checksum
    ├── AttachmentInvalid     truncated, reordered, spliced or tampered attachment
    └── GroupStateError       a group change that does not apply (bad signature, not admin,
                              wrong base epoch, stale epoch)
Device-list and bundle errors are the shared ones of ``federation.keys``
(``DeviceListEquivocation``, ``DeviceListExpired``, ``DeviceListRollback``, ``BadBundle``).
"""

from __future__ import annotations


class CryptoError(Exception):
    code = "crypto_error"


class InvalidKey(CryptoError):
    code = "invalid_key"


class MalformedMessage(CryptoError):
    code = "malformed_message"


class DecryptionFailed(CryptoError):
    code = "decryption_failed"


class ReplayedMessage(CryptoError):
    code = "replayed_message"


class TooManySkipped(CryptoError):
    code = "too_many_skipped"


class UnsupportedVersion(CryptoError):
    code = "unsupported_version"


class BackupInvalid(CryptoError):
    code = "backup_invalid"


class AttachmentInvalid(CryptoError):
    code = "attachment_invalid"


class GroupStateError(CryptoError):
    code = "group_state_invalid"


class UnknownPrekey(MalformedMessage):
    """An initial message names a prekey id this device does not (or no longer) hold."""

    code = "unknown_prekey"


class RecoveryKeyMistyped(CryptoError):
    """A typed recovery key fails its format or checksum: caught before any decryption."""

    code = "recovery_key_mistyped"
