"""PQXDH key agreement, exactly DESIGN §4 (normative); there is no X3DH fallback.

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   [DH4 = DH(EK_A, OPK_B)]
    (CT, SS) = ML-KEM-1024.Encaps(PQPK_B)
    SK = HKDF-SHA-256(salt = 32×0x00, IKM = 32×0xFF ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS,
                      info = "SecureChat_PQXDH_X25519_SHA-256_ML-KEM-1024_v1", L = 32)
    AD = Encode(IK_A) ‖ Encode(IK_B) ‖ canonical msgpack [device address A, device address B]

Identity keys are Ed25519 (Encode(IK) = the 32-byte Ed25519 key) used for DH through
their X25519 form.  Encapsulation is randomised inside ``cryptography``, so it is a
parameter (``Encapsulate``) that vectors replace with a recorded (ciphertext, secret).
The responder computation never mutates the prekey store: ``session`` commits the
replay hash and one-time-key deletion only after the first message decrypts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clientsdk.crypto import primitives
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, ReplayedMessage
from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore, identity_dh_public, replay_hash
from clientsdk.crypto.primitives import Rng
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import AddressError
from federation.keys import MLKEM1024_PUBLIC_KEY_LEN, BadBundle, PrekeyBundle

INFO = b"SecureChat_PQXDH_X25519_SHA-256_ML-KEM-1024_v1"
KDF_PREFIX = b"\xff" * 32
KEY_LEN = 32
KEM_CIPHERTEXT_LEN = 1568
KEM_SHARED_SECRET_LEN = 32
KEM_ENCODING_PREFIX = b"\x01"

Encapsulate = Callable[[bytes], tuple[bytes, bytes]]
"""ML-KEM-1024 encapsulation: raw public key -> (ciphertext, shared secret)."""


def mlkem_encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    """The real (randomised) encapsulation of ``cryptography``."""
    try:
        shared_secret, ciphertext = MLKEM1024PublicKey.from_public_bytes(public_key).encapsulate()
    except ValueError:
        raise InvalidKey("ML-KEM-1024 public key is invalid") from None
    return ciphertext, shared_secret


def encode_kem(public_key: bytes) -> bytes:
    """EncodeKEM = 0x01 ‖ 1,568-byte key (DESIGN §4), for wherever a KEM key is encoded."""
    if len(public_key) != MLKEM1024_PUBLIC_KEY_LEN:
        raise InvalidKey("ML-KEM-1024 public key must be 1568 bytes")
    return KEM_ENCODING_PREFIX + public_key


def derive_shared_key(dh_outputs: list[bytes], kem_shared_secret: bytes) -> bytes:
    """SK = HKDF(32×0xFF ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS) with DESIGN §4's salt and info."""
    ikm = KDF_PREFIX + b"".join(dh_outputs) + kem_shared_secret
    return primitives.hkdf_sha256(ikm, primitives.ZERO_SALT, INFO, KEY_LEN)


def associated_data(initiator_identity: bytes, responder_identity: bytes,
                    initiator: DeviceAddress, responder: DeviceAddress) -> bytes:
    """AD = Encode(IK_A) ‖ Encode(IK_B) ‖ canonical [address A, address B]."""
    return initiator_identity + responder_identity + codec.encode([str(initiator), str(responder)])


@dataclass(frozen=True, slots=True)
class InitialMessage:
    """The PQXDH fields the initiator sends with its first messages."""

    identity_key: bytes              # IK_A (Ed25519)
    ephemeral_key: bytes             # EK_A (X25519)
    signed_prekey_id: int
    one_time_prekey_id: int | None
    pq_prekey_id: int
    kem_ciphertext: bytes

    def __post_init__(self) -> None:
        if len(self.identity_key) != 32 or len(self.ephemeral_key) != 32:
            raise MalformedMessage("identity and ephemeral keys must be 32 bytes")
        if len(self.kem_ciphertext) != KEM_CIPHERTEXT_LEN:
            raise MalformedMessage("ML-KEM-1024 ciphertext must be 1568 bytes")

    @property
    def replay_hash(self) -> bytes:
        return replay_hash(self.identity_key, self.ephemeral_key, self.kem_ciphertext)


@dataclass(frozen=True, slots=True, repr=False)
class InitiatorAgreement:
    shared_key: bytes
    associated_data: bytes
    initial: InitialMessage
    their_address: DeviceAddress
    their_identity_key: bytes
    their_ratchet_key: bytes         # SPK_B: the initiator's first receiving ratchet key


@dataclass(frozen=True, slots=True, repr=False)
class ResponderAgreement:
    shared_key: bytes
    associated_data: bytes
    initial: InitialMessage
    my_ratchet_key: X25519PrivateKey  # SPK_B's private half: the responder's first ratchet key


def initiate(me: DeviceIdentity, my_address: DeviceAddress, bundle: PrekeyBundle, rng: Rng,
             encapsulate: Encapsulate = mlkem_encapsulate) -> InitiatorAgreement:
    """Run PQXDH against a claimed bundle.

    Raises ``BadBundle`` (signatures, missing PQ prekey, bad address) or
    ``InvalidKey`` (a small-order identity, signed or one-time prekey).
    """
    if bundle.pq_prekey is None:
        raise BadBundle("bundle has no signed ML-KEM-1024 prekey")
    bundle.verify()
    try:
        their_address = DeviceAddress.parse(bundle.device)
    except AddressError:
        raise BadBundle("bundle names an invalid device address") from None
    their_identity_dh = identity_dh_public(bundle.identity_key)
    spk = bundle.signed_prekey.public_key
    ephemeral = primitives.x25519_from_seed(rng(32))
    dh = [
        primitives.x25519(me.dh_private, spk),
        primitives.x25519(ephemeral, their_identity_dh),
        primitives.x25519(ephemeral, spk),
    ]
    if bundle.one_time_prekey is not None:
        dh.append(primitives.x25519(ephemeral, bundle.one_time_prekey.public_key))
    ciphertext, kem_secret = encapsulate(bundle.pq_prekey.public_key)
    if len(kem_secret) != KEM_SHARED_SECRET_LEN:
        raise InvalidKey("ML-KEM-1024 shared secret must be 32 bytes")
    initial = InitialMessage(
        me.public_key, primitives.x25519_public_bytes(ephemeral), bundle.signed_prekey.key_id,
        None if bundle.one_time_prekey is None else bundle.one_time_prekey.key_id,
        bundle.pq_prekey.key_id, ciphertext)
    return InitiatorAgreement(
        derive_shared_key(dh, kem_secret),
        associated_data(me.public_key, bundle.identity_key, my_address, their_address),
        initial, their_address, bundle.identity_key, spk)


def respond(me: DeviceIdentity, my_address: DeviceAddress, their_address: DeviceAddress,
            prekeys: PrekeyStore, initial: InitialMessage) -> ResponderAgreement:
    """The responder's side; reads ``prekeys`` but never changes it.

    Raises ``ReplayedMessage`` (initial message seen under this signed prekey),
    ``UnknownPrekey`` (a key id this device does not hold) or ``InvalidKey``.
    """
    if prekeys.has_seen(initial.signed_prekey_id, initial.replay_hash):
        raise ReplayedMessage("initial message was seen before")
    spk = prekeys.signed_prekey(initial.signed_prekey_id)
    spk_private = primitives.x25519_from_seed(spk.private)
    one_time = None if initial.one_time_prekey_id is None else prekeys.one_time_prekey(initial.one_time_prekey_id)
    kem_private = prekeys.pq_prekey(initial.pq_prekey_id)
    their_identity_dh = identity_dh_public(initial.identity_key)
    dh = [
        primitives.x25519(spk_private, their_identity_dh),
        primitives.x25519(me.dh_private, initial.ephemeral_key),
        primitives.x25519(spk_private, initial.ephemeral_key),
    ]
    if one_time is not None:
        dh.append(primitives.x25519(one_time, initial.ephemeral_key))
    try:
        kem_secret = kem_private.decapsulate(initial.kem_ciphertext)
    except ValueError:
        raise MalformedMessage("ML-KEM-1024 ciphertext is malformed") from None
    return ResponderAgreement(
        derive_shared_key(dh, kem_secret),
        associated_data(initial.identity_key, me.public_key, their_address, my_address),
        initial, spk_private)
