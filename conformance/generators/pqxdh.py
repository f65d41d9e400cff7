"""Vectors for PQXDH (DESIGN §4, normative): known answers with and without a one-time
prekey, and invalid bundles / initial messages.

``cryptography``'s ML-KEM-1024 encapsulation is randomised, so one encapsulation to
the fixed PQ prekey was recorded once (RECORDED_KEM_CIPHERTEXT / _SHARED_SECRET) and
is replayed through PQXDH's injectable ``encapsulate``; the vector test checks that
the fixed seed decapsulates it to the recorded secret."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey

from clientsdk.crypto import pqxdh, primitives
from clientsdk.crypto.identity import DeviceIdentity
from federation import codec, signing
from federation.addresses import DeviceAddress
from federation.keys import OneTimePrekey, PqPrekey, PrekeyBundle, SignedPrekey
from federation.signing import Purpose

ALICE = "alice@example.org/AAAAAAAAAA"
BOB = "bob@example.net/BBBBBBBBBB"
CREATED_MS = 1_700_000_000_000
SPK_ID, OTK_ID, PQ_ID = 7, 8, 9
PQ_SEED = hashlib.sha512(b"securechat/vectors/pqxdh/pq-prekey").digest()
RECORDED_KEM_CIPHERTEXT = bytes.fromhex(
    "4d053d8df690efc908eb74446c36d0b0893d1256689fbcdd65198a4cecd221a4da1e987919581b0abdb8e142b1d361a30907"
    "b38aace22e97b76070b26052e75086f34544679a91241b1572b6ebcb33efc88f4b985c6bd4e438aac9dcd9c3db441ed8b287"
    "ffd1f0f98d68c4049848db0c009b1da9f98c430d84fdc5c432b545f424bc9c56c5430ed6d367a5d103f2a744feb5055ab4d7"
    "b1ea5f55aa61ee758a86adc4a28ee17e409daf45b781b8b87016e953b77ba50767201d824d232e62611d60e2cf1ceafcfceb"
    "f54f122595da44b698e489d0c4117bb1daa8a2d4cc429c07515a7d14df344f154279754271b4a55b79d7271aa8a9fb165bd7"
    "a117d2dcea5f6998b4f8bb3e5c144a7b1e6526f19b4e10a83d19d7c302a1a3e24c36f694f63b5746c3a9b534748faaec7479"
    "dab24d7a56e229b6a9abfa4a21494df27af8c1ac6036f66c2985acc14a6de7e250a7caab4503f430c4de83a209b4cfeb5d65"
    "edec5ef6bee5a65d4be3d6737f0a0b2b7a76ee9d0ac2b44730c0f0b4f22e3fbae79ac037ebb12d2940c16c6240354569cbb2"
    "1f46bce13529ff27d609e295055e98ba3451b1452457d2adec22bf7d4585550583f00d4c0d08c8dd8e3fdf80e90b3729df66"
    "723f8ae3038854a3dd3ee32ca956391dbcae00749a34f9771b992a52839f59df4467e872a60b2767640bc20c7b783e8f3fbf"
    "9eecef122ae5354314568686a9b18e61efb235485b00f321f1d920853c43c4c4d3ddd97dbffdaa765000fda7bcd3283aba5d"
    "4f17ebe772b39768101dc16291f95c1d1c3fd083f30fce433c6a2cfc86fd3b7b1023534670a1f7caf1bb935c5fda67c24e8a"
    "4fb035c63941dd3317f362c9f8063e2507caddada433c96c84fbd88151bb7bb9a29396f4a612cfd85c3a9a37c62d93bb85cc"
    "1f24de1cfa7e1bee2efa45e780f3d26a4c84f7d8ab37e3bb1b8fc6e0f0b5dd49ab61f504ad094f8e96f5f21bbfd721c14fe9"
    "df4c3ba926e9ad844cab23ad3c3f9622d7735c6a868db8782da42cf3a603b64ae554859acc3e8a1cb6c4b23bdbc39f21cead"
    "1b7f11888721e2103a29b75827d1f1985a5d0a1135bde4889406360be1d7fdb2a9e5c069b3478cfd19fe49e41e8cdac1f28e"
    "52c1969832b75b2b02e61ec2270e40846668f48612ff3256eaaf235e4f9f53ae644a8d28fbfeb68f71a839a7d824de0a2128"
    "c754d11e8f3738b08c993e0f13f59e2a039d61a7943d49729b5081039b7408082316eb7daede70f6b58be867b13015abe779"
    "d38aa6d70ba9251ae6bc6e5dddf408d88b0af720aa5b313910c1f4c666164908d249be7bde8600e60dc3a8669cfc5ede6e71"
    "3e1201e409f16ac4a84f8f521232d324542cf21fd4d5315a8e55ed8eac2d32e56dbbb31158f571fdc906de6f381308c386b6"
    "697fc15d000511893cfd0dfedeeb630d55a524d274ac66131e8645cc2dc75f2ddf250bceb566c0214f0de0f802d7b8a26504"
    "031dd0706ca561f0258c6cfd0bc712b93e52248d6b194d9698afab245ad96d5b7d3ac8e841d665a03c1d31785b922ef5cb2c"
    "9bda24bf11aba3122e4d85d482ad10faca0010e8078759254eb3aee59bec2cc49ad7b28b03c7f9d3403e8a8cec15d993048f"
    "d8f865d2c8acd528644940f54a6f2fb0c8691dfe13eb71daf15343d6ef09f6020eae0f001e5e3fc3ec8788ab90bc0b94f18b"
    "9a3b8bb832be843bd8d2c7abb79157c5781412221980c46550310ab6bb5c2dd3b26186af542d561781e28f3920fdb0982432"
    "6912f15648d01f61d5832984c6c987f42e13ed5eb20833775e8bb11fe2727391dbb6d476ca54576c1bf23eac9a58d77f43fd"
    "86eab69b943a3812e5fe738c0a08a0e3729f99433ba2fc2f1f1404224c6b744a29d22f2fb6572ded9544f31d66275f0ae7eb"
    "30d6a06156b069c32e413beeee662a8350a1a45c0a26cba736b779c2055631388f37046fb1ac98103ec00e469582a9028dc6"
    "0a327a8d8172c09e9cbac254de08564834c1935a1511f9bafa76e425408a9151abd5fc789fb24b2d786198a8e06d829a9bfa"
    "0fd5fdb1481de7b2f0bd081464e15bf9c89e06d8228ec4f0a2ccda555cc7de3b200b0249e707de2afd4e3d6e99fbc1e0c062"
    "b71f0430d6bfa4096a83477a9f5df05b191d8ebe281a1e8b939413f69b75cb02e98fa8e724397a4e48ab35f79d1036081fda"
    "a742d1646fa3836ae0d5373a172392364cd8"
)
RECORDED_KEM_SHARED_SECRET = bytes.fromhex("c1ac00fd1f1d61826744646958d36c6896571f5fbf198027a6b0b95921842fdc")
# Ed25519 encodings of small-order points: the identity (order 1) and a point of order 4.
SMALL_ORDER_ED25519 = bytes.fromhex("01" + "00" * 31)
SMALL_ORDER_X25519 = bytes(32)


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"securechat/vectors/pqxdh/{label}".encode()).digest()


def _fixed_rng(value: bytes) -> primitives.Rng:
    def rng(n: int) -> bytes:
        if n != len(value):
            raise ValueError("unexpected randomness request")
        return value
    return rng


def parameters() -> dict[str, Any]:
    alice = DeviceIdentity.from_private_bytes(_seed("alice-identity"))
    bob = DeviceIdentity.from_private_bytes(_seed("bob-identity"))
    spk = primitives.x25519_from_seed(_seed("bob-signed-prekey"))
    otk = primitives.x25519_from_seed(_seed("bob-one-time-prekey"))
    pq_public = MLKEM1024PrivateKey.from_seed_bytes(PQ_SEED).public_key().public_bytes_raw()
    return {
        "info": pqxdh.INFO.decode(), "alice_address": ALICE, "bob_address": BOB,
        "alice_identity_seed": _seed("alice-identity").hex(), "alice_identity_public": alice.public_key.hex(),
        "bob_identity_seed": _seed("bob-identity").hex(), "bob_identity_public": bob.public_key.hex(),
        "signed_prekey": {"id": SPK_ID, "seed": _seed("bob-signed-prekey").hex(),
                          "public": primitives.x25519_public_bytes(spk).hex(), "created_ms": CREATED_MS},
        "one_time_prekey": {"id": OTK_ID, "seed": _seed("bob-one-time-prekey").hex(),
                            "public": primitives.x25519_public_bytes(otk).hex()},
        "pq_prekey": {"id": PQ_ID, "seed": PQ_SEED.hex(), "public": pq_public.hex(), "last_resort": True,
                      "created_ms": CREATED_MS},
        "ephemeral_seed": _seed("alice-ephemeral").hex(),
        "kem_ciphertext": RECORDED_KEM_CIPHERTEXT.hex(), "kem_shared_secret": RECORDED_KEM_SHARED_SECRET.hex(),
    }


def _bundle(p: dict[str, Any], bob: DeviceIdentity, with_otk: bool) -> PrekeyBundle:
    spk = SignedPrekey.create(bob.signing_key, SPK_ID, bytes.fromhex(p["signed_prekey"]["public"]), CREATED_MS)
    pq = PqPrekey.create(bob.signing_key, PQ_ID, bytes.fromhex(p["pq_prekey"]["public"]), True, CREATED_MS)
    otk = OneTimePrekey(OTK_ID, bytes.fromhex(p["one_time_prekey"]["public"])) if with_otk else None
    return PrekeyBundle(BOB, bob.public_key, spk, pq, otk)


def _hex_bundle(wire: dict[str, Any]) -> str:
    return codec.encode(wire).hex()


def _initial_wire(initial: pqxdh.InitialMessage) -> dict[str, Any]:
    return {"identity_key": initial.identity_key.hex(), "ephemeral_key": initial.ephemeral_key.hex(),
            "signed_prekey_id": initial.signed_prekey_id, "one_time_prekey_id": initial.one_time_prekey_id,
            "pq_prekey_id": initial.pq_prekey_id, "kem_ciphertext": initial.kem_ciphertext.hex()}


def generate() -> dict[str, dict[str, Any]]:
    p = parameters()
    alice = DeviceIdentity.from_private_bytes(_seed("alice-identity"))
    bob = DeviceIdentity.from_private_bytes(_seed("bob-identity"))
    spk = primitives.x25519_from_seed(_seed("bob-signed-prekey"))
    otk = primitives.x25519_from_seed(_seed("bob-one-time-prekey"))
    ephemeral = primitives.x25519_from_seed(_seed("alice-ephemeral"))
    recorded = (RECORDED_KEM_CIPHERTEXT, RECORDED_KEM_SHARED_SECRET)
    cases: list[dict[str, Any]] = []
    agreements = {}
    for with_otk in (True, False):
        bundle = _bundle(p, bob, with_otk)
        agreement = pqxdh.initiate(alice, DeviceAddress.parse(ALICE), bundle,
                                   _fixed_rng(_seed("alice-ephemeral")), lambda pk: recorded)
        agreements[with_otk] = agreement
        dh = [primitives.x25519(alice.dh_private, primitives.x25519_public_bytes(spk)),
              primitives.x25519(ephemeral, bob.dh_public),
              primitives.x25519(ephemeral, primitives.x25519_public_bytes(spk))]
        if with_otk:
            dh.append(primitives.x25519(ephemeral, primitives.x25519_public_bytes(otk)))
        ikm = b"\xff" * 32 + b"".join(dh) + RECORDED_KEM_SHARED_SECRET
        if pqxdh.derive_shared_key(dh, RECORDED_KEM_SHARED_SECRET) != agreement.shared_key:
            raise RuntimeError("generator self-check failed")
        cases.append({
            "description": f"known answer {'with' if with_otk else 'without'} a one-time prekey",
            "result": "valid", "one_time_prekey": with_otk, "bundle": _hex_bundle(bundle.to_wire()),
            "ephemeral_public": primitives.x25519_public_bytes(ephemeral).hex(),
            "alice_identity_x25519": alice.dh_public.hex(), "bob_identity_x25519": bob.dh_public.hex(),
            "dh": [d.hex() for d in dh], "ikm": ikm.hex(), "shared_key": agreement.shared_key.hex(),
            "associated_data": agreement.associated_data.hex(), "initial": _initial_wire(agreement.initial),
            "replay_hash": agreement.initial.replay_hash.hex(),
        })
    good = _bundle(p, bob, True)
    no_pq = good.to_wire()
    del no_pq["pq_prekey"]
    bad_spk = good.to_wire()
    bad_spk["signed_prekey"]["sig"] = bytes(64)
    confused = good.to_wire()
    confused["pq_prekey"]["sig"] = signing.sign(bob.signing_key, Purpose.SIGNED_PREKEY, good.pq_prekey.fields())
    small_spk = good.to_wire()
    small_spk["signed_prekey"] = SignedPrekey.create(bob.signing_key, SPK_ID, SMALL_ORDER_X25519,
                                                     CREATED_MS).to_wire()
    small_otk = good.to_wire()
    small_otk["one_time_prekey"] = {"id": OTK_ID, "key": SMALL_ORDER_X25519}
    short_pq = good.to_wire()
    short_pq["pq_prekey"]["key"] = short_pq["pq_prekey"]["key"][:-1]
    for description, wire, error in [
        ("bundle without a PQ prekey", no_pq, "BadBundle"),
        ("signed prekey signature does not verify", bad_spk, "BadBundle"),
        ("PQ prekey signed under the signed-prekey purpose", confused, "BadBundle"),
        ("PQ prekey of 1,567 bytes", short_pq, "BadBundle"),
        ("small-order signed prekey (validly signed)", small_spk, "InvalidKey"),
        ("small-order one-time prekey", small_otk, "InvalidKey"),
    ]:
        cases.append({"description": description, "result": "invalid", "error": error, "side": "initiator",
                      "bundle": _hex_bundle(wire)})
    initial = _initial_wire(agreements[True].initial)
    for description, change, seen, error in [
        ("replayed initial message", {}, [agreements[True].initial.replay_hash.hex()], "ReplayedMessage"),
        ("small-order ephemeral key", {"ephemeral_key": SMALL_ORDER_X25519.hex()}, [], "InvalidKey"),
        ("small-order identity key", {"identity_key": SMALL_ORDER_ED25519.hex()}, [], "InvalidKey"),
        ("KEM ciphertext of 1,567 bytes", {"kem_ciphertext": initial["kem_ciphertext"][:-2]}, [],
         "MalformedMessage"),
        ("ephemeral key of 31 bytes", {"ephemeral_key": initial["ephemeral_key"][:-2]}, [], "MalformedMessage"),
        ("unknown one-time prekey id", {"one_time_prekey_id": 99}, [], "UnknownPrekey"),
        ("unknown signed prekey id", {"signed_prekey_id": 99}, [], "UnknownPrekey"),
    ]:
        cases.append({"description": description, "result": "invalid", "error": error, "side": "responder",
                      "initial": {**initial, **change}, "seen_replay_hashes": seen})
    return {"pqxdh": {
        "source": "Self-generated by conformance/generators/pqxdh.py from fixed keys (seeds = SHA-256/SHA-512 of "
                  "fixed labels), a fixed ephemeral seed and one recorded ML-KEM-1024 encapsulation (ciphertext "
                  "and shared secret) to the fixed PQ prekey, replayed because the library's encapsulation is "
                  "randomised; the responder recomputes the shared secret by decapsulation.",
        "parameters": p,
        "cases": cases,
    }}
