"""Signed server-to-server transactions: vectors in both directions, and every rejection."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conformance.generators import s2s as gen
from conformance.vectorfiles import load_vectors
from federation import codec, s2s, signing
from federation.errors import ErrorCode, RequestRejected
from federation.inbound import InboundState
from federation.s2s import (
    DEFAULT_CLASS, Envelope, EnvelopeClass, EnvelopeKind, sign_transaction, verify_transaction,
)
from federation.s2s_frame import RejectReason

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
               s2s.MisaddressedEnvelope, s2s.ReplayedTransaction]
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


# --- s2s-request: signed requests and their signed answers ----------------------------------

RID = b"r" * 16


def request_frame(*, op="get_device_list", args=None, ts_ms=T0, destination="example.net", key=KEY,
                  key_id=gen.KEY_ID, request_id=RID, origin="example.org"):
    return s2s.sign_request(key, key_id, origin=origin, destination=destination, ts_ms=ts_ms,
                            request_id=request_id, op=op, args={"user": "bob@example.net"} if args is None else args)


def verify_req(data, *, now_ms=T0 + 1000, destination="example.net", key_lookup=lookup):
    return s2s.verify_request(data, expected_destination=destination, now_ms=now_ms, key_lookup=key_lookup)


# The responder is example.org here too (its keys are the ones the vectors publish);
# the requester is example.net.
def response_frame(*, result=None, error=None, ts_ms=T0, destination="example.net", key=KEY,
                   key_id=gen.KEY_ID, request_id=RID, origin="example.org"):
    if result is None and error is None:
        result = {"user": "alice@example.org", "version": 3}
    return s2s.sign_response(key, key_id, origin=origin, destination=destination, ts_ms=ts_ms,
                             request_id=request_id, result=result, error=error)


def verify_resp(data, *, now_ms=T0 + 1000, origin="example.org", destination="example.net", request_id=RID,
                key_lookup=lookup):
    return s2s.verify_response(data, expected_origin=origin, expected_destination=destination,
                               request_id=request_id, now_ms=now_ms, key_lookup=key_lookup)


@pytest.mark.parametrize("op,args", [
    ("get_device_list", {"user": "bob@example.net"}),
    ("get_device_lists", {"users": ["bob@example.net", "carol@example.net"]}),
    ("claim", {"devices": ["bob@example.net/BOBLAPTOP2"]}),
])
def test_request_round_trip(op, args):
    data = request_frame(op=op, args=args)
    req = verify_req(data)
    assert req == s2s.S2SRequest("example.org", "example.net", T0, RID, op, args)
    body = codec.decode(codec.decode(data)["body"])
    assert body["ctx"] == "securechat/v1/s2s-request" and set(body) == {
        "ctx", "origin", "destination", "ts_ms", "request_id", "op", "args"}
    assert s2s.claimed_signer(data) == ("example.org", gen.KEY_ID)


def test_response_round_trip_returns_the_result():
    result = {"bundles": {"bob@example.net/BOBLAPTOP2": {"identity_key": b"k" * 32}}, "missing": []}
    assert verify_resp(response_frame(result=result)) == result
    assert verify_resp(response_frame(result={})) == {}


def test_replay_is_not_checked_here():
    data = request_frame()
    assert verify_req(data) == verify_req(data, now_ms=T0 + 2000)   # the endpoint remembers request ids


def test_request_refusals_reuse_the_transaction_checks():
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    old = Ed25519PrivateKey.from_private_bytes(gen._seed("origin-old-key"))
    with pytest.raises(s2s.UnknownServerKey):
        verify_req(request_frame(key_id="ed25519:nope"))
    with pytest.raises(s2s.BadTransactionSignature) as info:
        verify_req(request_frame(key=other))
    assert "request signature" in info.value.message
    with pytest.raises(s2s.ExpiredServerKey):
        verify_req(request_frame(key=old, key_id=gen.OLD_KEY_ID), now_ms=T0 + 60_000)
    with pytest.raises(s2s.WrongDestination):
        verify_req(request_frame(), destination="example.com")
    with pytest.raises(s2s.StaleTransaction):
        verify_req(request_frame(), now_ms=T0 + 300_001)
    verify_req(request_frame(), now_ms=T0 + 300_000)


def _resign(data, mutate, *, key=KEY, purpose=signing.Purpose.S2S_REQUEST):
    """Re-sign a request/response frame after changing its decoded body (ctx included)."""
    body = codec.decode(codec.decode(data)["body"])
    mutate(body)
    raw = codec.encode(body)
    fields = {k: v for k, v in body.items() if k != "ctx"}
    sig = signing.sign(key, purpose, fields) if body.get("ctx") == purpose.value else key.sign(raw)
    return codec.encode({"body": raw, "key_id": gen.KEY_ID, "sig": sig})


@pytest.mark.parametrize("mutate", [
    lambda b: b.update(op="delete_everything"),
    lambda b: b.update(op="response"),
    lambda b: b.update(args=[1]),
    lambda b: b.pop("args"),
    lambda b: b.update(extra=1),
    lambda b: b.update(request_id=b"short"),
    lambda b: b.update(origin="not a domain!"),
    lambda b: b.update(ts_ms=-1),
    lambda b: b.update(ctx="securechat/v1/s2s-txn"),
], ids=["unknown-op", "response-op", "args-not-map", "no-args", "extra-field", "short-id", "bad-origin",
        "negative-ts", "txn-ctx"])
def test_malformed_requests(mutate):
    with pytest.raises(s2s.MalformedTransaction) as info:
        verify_req(_resign(request_frame(), mutate))
    assert info.value.to_wire()["details"] == {"reason": "malformed"}


def test_request_of_a_future_version():
    with pytest.raises(s2s.UnsupportedVersion):
        verify_req(_resign(request_frame(), lambda b: b.update(ctx="securechat/v2/s2s-request")))


def test_purposes_do_not_cross():
    # a transaction is not a request, a request is not a response, and vice versa
    with pytest.raises(s2s.MalformedTransaction):
        verify_req(frame())
    with pytest.raises(s2s.MalformedTransaction):
        verify(request_frame())
    with pytest.raises(s2s.MalformedTransaction):
        verify_resp(request_frame())
    with pytest.raises(s2s.MalformedTransaction):
        verify_req(response_frame())
    # an s2s-request body signed under the s2s-txn purpose does not verify
    body = codec.decode(codec.decode(request_frame())["body"])
    fields = {k: v for k, v in body.items() if k != "ctx"}
    forged = codec.encode({"body": codec.encode(body), "key_id": gen.KEY_ID,
                           "sig": signing.sign(KEY, signing.Purpose.S2S_TXN, fields)})
    with pytest.raises(s2s.BadTransactionSignature):
        verify_req(forged)


def test_response_refusals():
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    with pytest.raises(s2s.UnknownServerKey):
        verify_resp(response_frame(key_id="ed25519:nope"))
    with pytest.raises(s2s.BadTransactionSignature):
        verify_resp(response_frame(key=other))
    with pytest.raises(s2s.ExpiredServerKey):
        verify_resp(response_frame(), now_ms=T0 + 400 * 86_400_000)
    with pytest.raises(s2s.WrongDestination):
        verify_resp(response_frame(destination="example.com"))
    with pytest.raises(s2s.StaleTransaction):
        verify_resp(response_frame(), now_ms=T0 - 300_001)


def test_mismatched_responses_are_refused():
    asked_elsewhere_calls = []

    def recording(origin, key_id):
        asked_elsewhere_calls.append(origin)
        return lookup(origin, key_id)

    with pytest.raises(s2s.MismatchedResponse):      # answered by another server than the one asked
        verify_resp(response_frame(), origin="example.com", key_lookup=recording)
    assert asked_elsewhere_calls == []               # refused before any key lookup
    with pytest.raises(s2s.MismatchedResponse) as info:   # answers another request
        verify_resp(response_frame(request_id=b"x" * 16))
    assert isinstance(info.value, s2s.WrongDestination)
    assert info.value.to_wire()["details"] == {"reason": "wrong_destination"}


@pytest.mark.parametrize("mutate", [
    lambda b: b.update(op="get_device_list"),
    lambda b: b.update(error={"code": "not_found", "message": "x"}),   # both result and error
    lambda b: b.pop("result"),
    lambda b: b.update(result=[1]),
], ids=["not-response-op", "result-and-error", "neither", "result-not-map"])
def test_malformed_responses(mutate):
    with pytest.raises(s2s.MalformedTransaction):
        verify_resp(_resign(response_frame(), mutate))


def test_malformed_error_answers():
    with pytest.raises(s2s.MalformedTransaction):
        verify_resp(response_frame(error={"code": "not_found", "message": "x", "secret": "y"}))
    with pytest.raises(s2s.MalformedTransaction):
        verify_resp(response_frame(error={"code": "not_found", "message": "m" * 2000}))


def test_error_answer_raises_with_our_message_never_the_remote_text():
    data = response_frame(error={"code": "not_found", "message": "<script>rm -rf</script> no such user"})
    with pytest.raises(s2s.RemoteRequestFailed) as info:
        verify_resp(data)
    exc = info.value
    assert exc.code is ErrorCode.REMOTE_ERROR
    assert exc.message == "example.org refused the request: not_found"
    assert exc.to_wire() == {"code": "remote_error", "message": "example.org refused the request: not_found",
                             "details": {"remote_code": "not_found"}}
    assert "script" not in str(exc.to_wire()) and exc.remote_code is ErrorCode.NOT_FOUND
    assert "no such user" in exc.remote_message          # kept for our logs only
    assert isinstance(exc, RequestRejected)


def test_error_answer_with_an_unknown_code():
    with pytest.raises(s2s.RemoteRequestFailed) as info:
        verify_resp(response_frame(error={"code": "rm -rf /", "message": "hello"}))
    assert info.value.to_wire() == {"code": "remote_error",
                                    "message": "example.org refused the request: unknown error"}
    assert info.value.remote_code is None


def test_sign_response_from_an_exception_signs_code_and_message_only():
    exc = RequestRejected("no such user here", code=ErrorCode.NOT_FOUND, details={"internal": "x"})
    with pytest.raises(s2s.RemoteRequestFailed) as info:
        verify_resp(response_frame(error=exc))
    assert info.value.remote_message == "no such user here"
    body = codec.decode(codec.decode(response_frame(error=exc))["body"])
    assert body["error"] == {"code": "not_found", "message": "no such user here"}


def test_signers_refuse_what_no_receiver_accepts():
    with pytest.raises(s2s.MalformedTransaction):
        request_frame(op="delete_everything")
    with pytest.raises(s2s.MalformedTransaction):
        request_frame(request_id=b"short")
    with pytest.raises(s2s.MalformedTransaction):
        request_frame(key_id="has space")
    with pytest.raises(s2s.MalformedTransaction):
        request_frame(args={"x": 1.5})
    with pytest.raises(ValueError):
        s2s.sign_response(KEY, gen.KEY_ID, origin="example.org", destination="example.net", ts_ms=T0,
                          request_id=RID, result={}, error={"code": "x", "message": "y"})


def test_claimed_signer_is_unverified_and_refuses_garbage():
    assert s2s.claimed_signer(frame()) == ("example.org", gen.KEY_ID)
    assert s2s.claimed_signer(response_frame()) == ("example.org", gen.KEY_ID)
    with pytest.raises(s2s.MalformedTransaction):
        s2s.claimed_signer(b"\xc1")


def test_key_traffic_is_not_an_envelope_kind():
    assert {k.value for k in EnvelopeKind} == {"message", "device_list", "device_list_digests",
                                              "delivery_report"}
