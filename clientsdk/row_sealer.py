"""Sealing the client store's rows: XChaCha20-Poly1305 with one HChaCha20 subkey per open store.

Why its own module: it is the store's hot-path encryption (every row of every commit)
and a small piece of careful crypto glue; ``tests/sdk/test_store_apply.py`` checks it
byte for byte against libsodium, which the store uses to open rows.
"""

from __future__ import annotations

import itertools
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305


class RowSealer:
    """XChaCha20-Poly1305 for row values, without a syscall or a libsodium call per row.

    Nonce = a random 16-byte prefix drawn per open store ‖ an 8-byte counter, so nonces
    never repeat under the key (two opens draw the same prefix with probability 2^-128).
    XChaCha20-Poly1305 (libsodium's ``_ietf`` variant, which ``Store._open`` decrypts)
    is ChaCha20-Poly1305 under the subkey HChaCha20(key, nonce[:16]) with nonce
    0^4 ‖ nonce[16:]; the prefix is fixed, so the subkey is computed once, here, and
    each row is one ``cryptography`` AEAD call, which keeps the GIL.
    """

    def __init__(self, key: bytes) -> None:
        self._prefix = os.urandom(16)
        self._counter = itertools.count()
        self._aead = ChaCha20Poly1305(hchacha20(key, self._prefix))

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        """``nonce (24) ‖ ciphertext ‖ tag (16)``, as ``crypto_aead_xchacha20poly1305_ietf_encrypt`` gives."""
        tail = next(self._counter).to_bytes(8, "little")
        return self._prefix + tail + self._aead.encrypt(b"\x00" * 4 + tail, plaintext, ad)


_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2) from ``cryptography``'s ChaCha20 block function.

    A ChaCha20 block is the permuted state plus the input state; HChaCha20 is words
    0–3 and 12–15 of the permuted state.  With the 16-byte counter‖nonce set to
    ``nonce16`` the input state is exactly HChaCha20's, so subtracting it back out of
    those words gives the subkey.
    """
    block = struct.unpack("<16I", Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64)))
    words = struct.unpack("<4I", nonce16)
    return struct.pack("<8I", *[(block[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)],
                       *[(block[12 + i] - words[i]) & 0xFFFFFFFF for i in range(4)])
