"""Errors of the client SDK (the crypto core has its own tree in ``clientsdk.crypto.errors``).

Each error has a stable ``code`` an application can act on; messages never hold
keys, secrets or plaintext, so they are safe to log and show.

    SdkError
    ├── StoreError                  the local store cannot be used
    │   ├── StoreKeyInvalid         wrong passphrase or store key (store_key_invalid)
    │   ├── StoreCorrupted          a row or the file fails authentication or parsing (store_corrupted)
    │   ├── StoreVersionUnsupported a schema / row version this SDK does not know (store_unsupported_version)
    │   ├── StoreExists             register/login refused to overwrite an existing store (store_exists)
    │   └── StoreMissing            open() on a path without a store (store_missing)
    ├── NotMasterDevice             an operation that needs the master key on a linked device
    ├── ContactKeyChanged           a contact's master key differs from the trusted one; sending stops
    ├── SendFailed                  a send could not complete (code from the server or local cause)
    ├── BackupFailed                a backup could not be written or read (I/O, nothing to back up yet);
    │                               a wrong passphrase or key is ``clientsdk.crypto.errors.BackupInvalid``
    ├── NotConnected                an operation that needs a connection, outside ``connect()``
    └── KeysUnavailable             a sender's keys cannot be fetched now; its envelope comes again later
"""

from __future__ import annotations

from clientsdk.crypto.errors import CryptoError, UnsupportedVersion
from federation.errors import ErrorCode, ProtocolError
from federation.rpc import RemoteError


class SdkError(Exception):
    code = "sdk_error"


class StoreError(SdkError):
    code = "store_error"


class StoreKeyInvalid(StoreError):
    code = "store_key_invalid"


class StoreCorrupted(StoreError):
    code = "store_corrupted"


class StoreVersionUnsupported(StoreError, UnsupportedVersion):
    code = "store_unsupported_version"


class StoreExists(StoreError):
    code = "store_exists"


class StoreMissing(StoreError):
    code = "store_missing"


class StoreInUse(StoreError):
    """Another process (or another open ``Store``) has this store: two at once would fork its sessions."""

    code = "store_in_use"


class NotMasterDevice(SdkError):
    code = "not_master_device"


class ContactKeyChanged(SdkError):
    code = "contact_key_changed"


class SendFailed(SdkError):
    code = "send_failed"

    def __init__(self, message: str, *, code: str = "send_failed") -> None:
        super().__init__(message)
        self.code = code


class NotConnected(SdkError):
    code = "not_connected"


class BackupFailed(SdkError):
    code = "backup_failed"


class KeysUnavailable(SdkError):
    """A sender's signed list could not be fetched right now (a transient server answer).

    The envelope is left unprocessed and unacknowledged, so the server pushes it again
    on the next connection: a passing failure must not turn a message into a
    ``decryption_failed`` event and lose it (LESSONS #1, #9).
    """

    code = "keys_unavailable"


# Server answers that say "not now" rather than "no": the sender's keys may be there later.
TRANSIENT_CODES = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.SHUTTING_DOWN, ErrorCode.REMOTE_ERROR,
                             ErrorCode.UNKNOWN_DOMAIN, ErrorCode.INTERNAL})


# What background work (prekey top-ups, group sends, key requests, history transfer) logs
# and tries again later; anything else is a bug and propagates.
RECOVERABLE_ERRORS: tuple[type[Exception], ...] = (SdkError, RemoteError, CryptoError, ProtocolError)

# A send whose recipients' device lists keep changing under it is re-encrypted this many
# times (``stale_devices``), then refused.
MAX_STALE_RETRIES = 4
