"""Signed server-to-server transactions: vectors in both directions, and every rejection."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conformance.generators import s2s as gen
from conformance.vectorfiles import load_vectors
from federation import codec, s2s, signing
from federation.inbound import InboundState
from federation.s2s import (
    DEFAULT_CLASS, Envelope, EnvelopeClass, EnvelopeKind, RejectReason, sign_transaction, verify_transaction,
)

VECTORS = load_vectors("s2s", "transaction")
PARAMS = VECTORS["parameters"]
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(PARAMS["origin_key_seed"]))
T0 = gen.T0
KEYS = {(k["origin"], k["key_id"]): (bytes.fromhex(k["public_key"]), k["valid_from_ms"], k["valid_until_ms"])
        for k in PARAMS["keys"]}


def lookup(origin, key_id):
    return KEYS[(origin, key_id)]


def env(kind=EnvelopeKind.MESSAGE, seq=1, sender="alice@example.org/ALICEPHON2", recipients=("bob@example.net",)):
    return gen.envelope(kind, seq, sender, recipients)


def frame(envelopes=None, *, ts_ms=T0, destination="example.net", key=KEY, key_id=gen.KEY_ID, txn_id=b"t" * 16):
    return sign_transaction(key, key_id, origin="example.org", destination=destination, ts_ms=ts_ms,
                            txn_id=txn_id, envelopes=envelopes if envelopes is not None else [env()])


def verify(data, *, now_ms=T0 + 1000, destination="example.net", key_lookup=lookup):
    return verify_transaction(data, expected_destination=destination, now_ms=now_ms, key_lookup=key_lookup)


# --- vectors ---------------------------------------------------------------------------


def test_vector_file_header():
    assert "self-generated" in VECTORS["source"].lower()
    assert {c["result"] for c in VECTORS["cases"]} == {"valid", "invalid"}


def test_vectors_regenerate_identically():
    assert gen.generate()["transaction"] == VECTORS


@pytest.mark.parametrize("case", [c for c in VECTORS["cases"] if c["result"] == "valid"],
                         ids=lambda c: c["description"])
def test_valid_vector_both_directions(case):
    expected = case["transaction"]
    envelopes = [Envelope(bytes.fromhex(e["id"]), EnvelopeKind(e["kind"]), EnvelopeClass(e["class"]), e["seq"],
                          e["sender"], tuple(e["recipients"]), bytes.fromhex(e["payload"]), e["ts_ms"],
                          e["expires_ms"]) for e in expected["envelopes"]]
    recomputed = sign_transaction(KEY, expected["key_id"], origin=expected["origin"],
                                  destination=expected["destination"], ts_ms=expected["ts_ms"],
                                  txn_id=bytes.fromhex(expected["txn_id"]), envelopes=envelopes)
    assert recomputed.hex() == case["frame"]
    assert codec.decode(recomputed)["body"].hex() == case["signing_input"]
    txn = verify(bytes.fromhex(case["frame"]), now_ms=case["now_ms"], destination=case["expected_destination"])
    assert txn.origin == expected["origin"] and txn.txn_id.hex() == expected["txn_id"]
    assert list(txn.envelopes) == envelopes


@pytest.mark.parametrize("case", [c for c in VECTORS["cases"] if c["result"] == "invalid"],
                         ids=lambda c: c["description"])
def test_invalid_vectors_raise_the_named_error(case):
    with pytest.raises(getattr(s2s, case["error"])):
        verify(bytes.fromhex(case["frame"]), now_ms=case["now_ms"], destination=case["expected_destination"])


def test_vectors_forge_every_kind():
    forged = [c for c in VECTORS["cases"] if c.get("error") == "ForgedOrigin"]
    assert len(forged) == len(EnvelopeKind)


# --- rejections, each with its own error and stable reason ---------------------------------


@pytest.mark.parametrize("kind", list(EnvelopeKind))
@pytest.mark.parametrize("sender", ["mallory@example.com", "mallory@example.com/MALLORYPH2",
                                    "alice@example.org.evil", "alice@example.net"])
def test_forged_origin_rejected_for_every_kind(kind, sender):
    data = frame([env(kind, 1, "alice@example.org"), env(kind, 2, sender)])
    with pytest.raises(s2s.ForgedOrigin) as info:
        verify(data)
    assert info.value.to_wire()["details"] == {"reason": "forged_origin"}


def test_tampered_signature():
    obj = codec.decode(frame())
    obj["sig"] = bytes([obj["sig"][0] ^ 0x80]) + obj["sig"][1:]
    with pytest.raises(s2s.BadTransactionSignature):
        verify(codec.encode(obj))


def test_tampered_body_fails_signature():
    obj = codec.decode(frame())
    body = codec.decode(obj["body"])
    body["ts_ms"] += 1
    obj["body"] = codec.encode(body)
    with pytest.raises(s2s.BadTransactionSignature):
        verify(codec.encode(obj))


def test_signed_by_another_key_under_the_same_id():
    with pytest.raises(s2s.BadTransactionSignature):
        verify(frame(key=Ed25519PrivateKey.from_private_bytes(bytes(32))))


def test_unknown_key():
    with pytest.raises(s2s.UnknownServerKey):
        verify(frame(key_id="ed25519:nope"))

    def explicit(origin, key_id):
        raise s2s.UnknownServerKey("none")

    with pytest.raises(s2s.UnknownServerKey):
        verify(frame(), key_lookup=explicit)


def test_lookup_failure_that_is_not_a_verdict_propagates():
    def down(origin, key_id):
        raise ConnectionError("discovery unreachable")

    with pytest.raises(ConnectionError):
        verify(frame(), key_lookup=down)


def test_key_valid_at_ts_but_not_now_and_vice_versa():
    old = Ed25519PrivateKey.from_private_bytes(gen._seed("origin-old-key"))
    new = Ed25519PrivateKey.from_private_bytes(gen._seed("origin-new-key"))
    verify(frame(key=old, key_id=gen.OLD_KEY_ID), now_ms=T0 + 59_999)
    with pytest.raises(s2s.ExpiredServerKey):
        verify(frame(key=old, key_id=gen.OLD_KEY_ID), now_ms=T0 + 60_000)
    with pytest.raises(s2s.ExpiredServerKey):
        verify(frame(key=new, key_id=gen.NEW_KEY_ID), now_ms=T0 + 120_000)
    verify(frame(key=new, key_id=gen.NEW_KEY_ID, ts_ms=T0 + 60_000), now_ms=T0 + 120_000)


def test_replay_to_same_server_is_a_duplicate_not_an_error():
    data = frame()
    state = InboundState("example.org")
    first = state.accept(verify(data), T0 + 1000)
    again = state.accept(verify(data, now_ms=T0 + 2000), T0 + 2000)
    assert (first.duplicate, len(first.release)) == (False, 1)
    assert (again.duplicate, again.release) == (True, [])


def test_replay_to_third_server():
    with pytest.raises(s2s.WrongDestination):
        verify(frame(), destination="example.com")


def test_replay_after_ten_minutes_and_skew_bound():
    data = frame()
    verify(data, now_ms=T0 + 300_000)
    verify(data, now_ms=T0 - 300_000)
    with pytest.raises(s2s.StaleTransaction):
        verify(data, now_ms=T0 + 600_000)
    with pytest.raises(s2s.StaleTransaction):
        verify(data, now_ms=T0 - 300_001)


def test_each_rejection_has_its_own_stable_reason():
    classes = [s2s.MalformedTransaction, s2s.UnknownServerKey, s2s.BadTransactionSignature,
               s2s.ExpiredServerKey, s2s.WrongDestination, s2s.StaleTransaction, s2s.ForgedOrigin,
               s2s.MisaddressedEnvelope]
    reasons = [c("x").to_wire()["details"]["reason"] for c in classes]
    assert sorted(reasons) == sorted(r.value for r in RejectReason)
    assert all(issubclass(c, s2s.TransactionRejected) for c in classes)


@pytest.mark.parametrize("mutate", [
    lambda f: b"\x00" + f,
    lambda f: f + b"\x00",
    lambda f: codec.encode({**codec.decode(f), "extra": 1}),
    lambda f: codec.encode({**codec.decode(f), "sig": b"short"}),
    lambda f: codec.encode({**codec.decode(f), "body": b"\xc1"}),
    lambda f: codec.encode({**codec.decode(f), "key_id": "bad id"}),
    lambda f: codec.encode([1, 2]),
], ids=["prefix", "trailing", "extra-field", "short-sig", "bad-body", "bad-key-id", "not-a-map"])
def test_malformed_frames(mutate):
    with pytest.raises(s2s.MalformedTransaction):
        verify(mutate(frame()))


def _signed_body(mutate_envelope):
    e = env().to_wire()
    mutate_envelope(e)
    fields = {"origin": "example.org", "destination": "example.net", "ts_ms": T0, "txn_id": b"t" * 16,
              "envelopes": [e]}
    body = signing.signing_input(signing.Purpose.S2S_TXN, fields)
    return codec.encode({"body": body, "key_id": gen.KEY_ID, "sig": KEY.sign(body)})


@pytest.mark.parametrize("mutate", [
    lambda e: e.update(kind="presence"),
    lambda e: e.update({"class": "bulk"}),
    lambda e: e.update(seq=0),
    lambda e: e.update(id=b"short"),
    lambda e: e.update(recipients=[]),
    lambda e: e.update(sender="not an address"),
    lambda e: e.update(expires_ms=e["ts_ms"]),
    lambda e: e.pop("payload"),
], ids=["kind", "class", "seq0", "id", "no-recipients", "sender", "expiry", "missing"])
def test_malformed_envelopes_reject_whole_transaction(mutate):
    with pytest.raises(s2s.MalformedTransaction):
        verify(_signed_body(mutate))


def test_sign_refuses_what_no_receiver_accepts():
    with pytest.raises(s2s.MalformedTransaction):
        frame(key_id="has space")
    with pytest.raises(s2s.MalformedTransaction):
        frame(txn_id=b"short")


def test_every_kind_has_a_class_and_device_traffic_is_control():
    assert DEFAULT_CLASS[EnvelopeKind.MESSAGE] is EnvelopeClass.MESSAGE
    assert all(DEFAULT_CLASS[k] is EnvelopeClass.CONTROL for k in EnvelopeKind if k is not EnvelopeKind.MESSAGE)
