"""What a receiving homeserver refuses, seen from the sending server's side of a real link.

Every refusal must carry the right code and ``details.reason``, leave nothing stored
and never reach a local client.  Frames are built by hand with a peer's real server
key (example.com plays the malicious or confused peer).
"""

from __future__ import annotations

import os

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conformance.client import ProtocolDevice, authenticate
from federation import codec
from federation.rpc import RemoteError, open_rpc
from federation.s2s import Envelope, EnvelopeClass, EnvelopeKind, sign_transaction
from homeserver.server_keys import ServerKey, current_key
from tests.interdomain.conftest import federation_of
from tests.sdk.conftest import PASSWORD, mock_ms

ORG, NET, COM = "example.org", "example.net", "example.com"
DAY_MS = 86_400_000


@pytest.fixture
async def three(tmp_path):
    async with federation_of(tmp_path, (ORG, NET, COM)) as fed:
        yield fed


async def register_device(fed, user: str) -> ProtocolDevice:
    """Register ``user`` on its server with the raw protocol (no crypto beyond keys)."""
    domain = user.split("@")[1]
    device = ProtocolDevice(user, master=Ed25519PrivateKey.generate())
    async with open_rpc(await fed.network.connect(domain)) as rpc:
        await rpc.request("register", user=user, password=PASSWORD,
                          master_key=device.master.public_key().public_bytes_raw(),
                          device_id=device.device_id, identity_key=device.identity_public,
                          device_list=device.device_list([device], issued_ms=mock_ms()).to_wire())
        await authenticate(rpc, device, domain)
    return device


def envelope(kind: EnvelopeKind, seq: int, sender: str, recipients: list[str], payload: bytes = b"x",
             cls: EnvelopeClass | None = None) -> Envelope:
    now = mock_ms()
    cls = cls or (EnvelopeClass.MESSAGE if kind is EnvelopeKind.MESSAGE else EnvelopeClass.CONTROL)
    return Envelope(os.urandom(16), kind, cls, seq, sender, tuple(recipients), payload, now, now + DAY_MS)


def message_payload(message_id: str, devices: list[str], ciphertext: bytes) -> bytes:
    return codec.encode({"message_id": message_id, "repair": False,
                         "payloads": [{"devices": devices, "ciphertext": ciphertext}]})


def signed(key: ServerKey, origin: str, destination: str, envelopes: list[Envelope], ts_ms: int | None = None) -> bytes:
    return sign_transaction(key.private_key, key.key_id, origin=origin, destination=destination,
                            ts_ms=mock_ms() if ts_ms is None else ts_ms, txn_id=os.urandom(16),
                            envelopes=envelopes)


async def submit(fed, origin: str, destination: str, frame: bytes) -> None:
    link = await fed.orgs[origin].homeserver.federation.links.get(destination)
    await link.send_transaction(frame)


def com_key(fed) -> ServerKey:
    return current_key(fed.orgs[COM].keys, mock_ms())


FORGED_SENDERS = {
    EnvelopeKind.MESSAGE: "alice@example.org/AAAAAAAAAA",
    EnvelopeKind.DEVICE_LIST: "alice@example.org",
    EnvelopeKind.DEVICE_LIST_DIGESTS: "=server@example.org",
    EnvelopeKind.DELIVERY_REPORT: "=server@example.org",
}


@pytest.mark.parametrize("kind", list(EnvelopeKind))
async def test_forged_origin_is_rejected_for_every_envelope_kind(three, kind):
    """example.com sends, in its own signed transaction, an envelope in the name of example.org."""
    sender = FORGED_SENDERS[kind]
    frame = signed(com_key(three), COM, NET, [envelope(kind, 1, sender, [f"=server@{NET}"])])
    with pytest.raises(RemoteError) as info:
        await submit(three, COM, NET, frame)
    assert info.value.details["reason"] == "forged_origin"
    assert await three.orgs[NET].homeserver.storage.federation.inbound_next_seq(COM) == \
        {EnvelopeClass.CONTROL: 1, EnvelopeClass.MESSAGE: 1}


async def test_tampered_unknown_and_expired_keys_are_rejected(three):
    env = envelope(EnvelopeKind.DEVICE_LIST_DIGESTS, 1, f"=server@{COM}", [f"=server@{NET}"],
                   codec.encode({"users": {}}))
    good = signed(com_key(three), COM, NET, [env])
    obj = codec.decode(good)
    tampered = codec.encode({**obj, "sig": bytes(64)})
    with pytest.raises(RemoteError) as info:
        await submit(three, COM, NET, tampered)
    assert info.value.details["reason"] == "bad_signature"
    stranger = ServerKey("ed25519:nobody", Ed25519PrivateKey.generate(), 0, 10**15)
    with pytest.raises(RemoteError) as info:
        await submit(three, COM, NET, signed(stranger, COM, NET, [env]))
    assert info.value.details["reason"] == "unknown_key"
    # a key of example.com that ended yesterday: published, but not valid now
    expired = ServerKey("ed25519:old", Ed25519PrivateKey.generate(), 0, mock_ms() - DAY_MS)
    three.orgs[COM].keys.append(expired)
    three.orgs[NET].homeserver.federation.discovery._static_docs.clear()   # noqa: SLF001 - republish below
    from federation.discovery import parse_document
    from tests.interdomain.conftest import document
    three.orgs[NET].homeserver.federation.discovery._static_docs[COM] = parse_document(   # noqa: SLF001
        document(COM, three.orgs[COM].keys), COM)
    with pytest.raises(RemoteError) as info:
        await submit(three, COM, NET, signed(expired, COM, NET, [env], ts_ms=mock_ms() - 2 * DAY_MS))
    assert info.value.details["reason"] == "expired_key"


async def test_replays_to_the_same_server_another_server_and_later_are_rejected(three, autojump_clock):
    env = envelope(EnvelopeKind.DEVICE_LIST_DIGESTS, 1, f"=server@{COM}", [f"=server@{NET}"],
                   codec.encode({"users": {}}))
    frame = signed(com_key(three), COM, NET, [env])
    await submit(three, COM, NET, frame)                         # the real one is accepted
    with pytest.raises(RemoteError) as info:                      # the same bytes again
        await submit(three, COM, NET, frame)
    assert info.value.details["reason"] == "replayed"
    with pytest.raises(RemoteError) as info:                      # to a third server
        await submit(three, COM, ORG, frame)
    assert info.value.details["reason"] == "wrong_destination"
    later = signed(com_key(three), COM, NET, [envelope(EnvelopeKind.DEVICE_LIST_DIGESTS, 2, f"=server@{COM}",
                                                        [f"=server@{NET}"], codec.encode({"users": {}}))])
    await trio.sleep(600)                                         # ten minutes later
    with pytest.raises(RemoteError) as info:
        await submit(three, COM, NET, later)
    assert info.value.details["reason"] == "stale_timestamp"


async def test_a_retried_transaction_arriving_after_a_later_one_is_delivered_in_order(three):
    bob = await register_device(three, f"bob@{NET}")
    sender = f"carol@{COM}/CCCCCCCCCC"
    first = envelope(EnvelopeKind.MESSAGE, 1, sender, [bob.user],
                     message_payload("m1", [bob.address], b"ciphertext one"))
    second = envelope(EnvelopeKind.MESSAGE, 2, sender, [bob.user],
                      message_payload("m2", [bob.address], b"ciphertext two"))
    key = com_key(three)
    await submit(three, COM, NET, signed(key, COM, NET, [second]))    # the later one arrives first: held
    await submit(three, COM, NET, signed(key, COM, NET, [first]))     # the retry fills the gap
    mailbox = await three.orgs[NET].homeserver.storage.mailboxes.pending(bob.address, 0, 10)
    assert [(e.sender, e.message_id, e.ciphertext) for e in mailbox] == [
        (sender, "m1", b"ciphertext one"), (sender, "m2", b"ciphertext two")]
