"""Thin, typed wrappers over ``cryptography`` and ``pynacl``: the only primitives the core uses.

Randomness is always a parameter (``Rng``) so that vectors can fix it.
"""

from __future__ import annotations

import hmac as _hmac
import os
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clientsdk.crypto.errors import DecryptionFailed, InvalidKey

Rng = Callable[[int], bytes]
ZERO_SALT = bytes(32)


def system_rng(n: int) -> bytes:
    return os.urandom(n)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    # Not ``hmac.digest``: its one-shot OpenSSL call releases the GIL whatever the size, and
    # getting it back from the SDK's store threads cost ~0.4 ms per call under load; ``hmac.new``
    # keeps it for inputs under 2 KiB.  Same bytes.
    return _hmac.new(key, data, "sha256").digest()


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison for secrets and MACs."""
    return _hmac.compare_digest(a, b)


def ed25519_public_to_x25519(public_key: bytes) -> bytes:
    """libsodium's birational map; small-order and non-canonical points raise ``InvalidKey``."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise InvalidKey("Ed25519 public key must be 32 bytes")
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key)
    except nacl.exceptions.RuntimeError:
        raise InvalidKey("Ed25519 public key is a small-order or invalid point") from None


def ed25519_private_to_x25519(private_key: Ed25519PrivateKey) -> X25519PrivateKey:
    seed = private_key.private_bytes_raw()
    public = private_key.public_key().public_bytes_raw()
    scalar = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(seed + public)
    return X25519PrivateKey.from_private_bytes(scalar)


def x25519_public(raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise InvalidKey("X25519 public key must be 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def x25519(private_key: X25519PrivateKey, public_key: bytes) -> bytes:
    """X25519 with the all-zero (small-order peer) output rejected as ``InvalidKey``."""
    try:
        return private_key.exchange(x25519_public(public_key))
    except ValueError:
        raise InvalidKey("X25519 public key is a small-order point") from None


def x25519_from_seed(seed: bytes) -> X25519PrivateKey:
    if len(seed) != 32:
        raise InvalidKey("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(seed)


def x25519_public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


def aes256_cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(padded) + enc.finalize()


def aes256_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """Decrypt and unpad; only ever called after the MAC has been checked."""
    if not ciphertext or len(ciphertext) % 16:
        raise DecryptionFailed("decryption failed")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionFailed("decryption failed") from None
