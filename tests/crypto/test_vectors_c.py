"""Conformance vectors for attachments, backups and verification, checked in both directions:
known answers are recomputed from the fixed inputs, and invalid cases raise the named error."""

import functools
import hashlib

import pytest

from clientsdk.crypto import errors
from clientsdk.crypto.attachments import AttachmentPointer, decrypt_attachment, encrypt_attachment
from clientsdk.crypto.backup import (
    BackupContents, RecoveryKey, export_local_file, open_local_file, open_server_backup, seal_for_server,
)
from clientsdk.crypto.verification import (
    ContactCode, Party, compare_scanned, displayable, fingerprint, qr_payload, safety_number,
)
from conformance.generators import attachment as attachment_gen
from conformance.vectorfiles import load_vectors
from federation.addresses import UserAddress


def cases(construction, name, result=None):
    data = load_vectors(construction, name)
    assert "self-generated" in data["source"].lower()
    assert data["cases"]
    return [c for c in data["cases"] if result is None or c["result"] == result]


def error_class(name):
    return getattr(errors, name)


def parts_rng(*parts):
    queue = list(parts)
    return lambda n: queue.pop(0)


def party(obj):
    return Party(UserAddress.parse(obj["address"]), bytes.fromhex(obj["master_public_key"]))


def test_every_file_has_both_kinds_of_case():
    for construction, name in [("attachment", "stream"), ("attachment", "pointer"), ("backup", "recovery_key"),
                               ("backup", "server"), ("backup", "local"), ("safety_number", "qr_scan"),
                               ("safety_number", "contact_code")]:
        results = {c["result"] for c in cases(construction, name)}
        assert results == {"valid", "invalid"}, (construction, name)


# --- attachments --------------------------------------------------------------------

def _recompute(case):
    plaintext = attachment_gen.pattern(case["plaintext_size"])
    return plaintext, *encrypt_attachment(plaintext, case["content_type"],
                                          parts_rng(bytes.fromhex(case["key"]), bytes.fromhex(case["nonce_prefix"])))


STREAM_VALID = cases("attachment", "stream", "valid")


@pytest.mark.parametrize("case", STREAM_VALID, ids=lambda c: c["id"])
def test_attachment_known_answers(case):
    plaintext, ciphertext, pointer = _recompute(case)
    assert len(ciphertext) == case["ciphertext_size"]
    assert hashlib.sha256(ciphertext).hexdigest() == case["ciphertext_sha256"]
    assert pointer.encode().hex() == case["pointer"]
    assert [ciphertext[i - 16:i].hex() for i in _segment_ends(len(ciphertext))] == case["segment_tags"]
    if "ciphertext" in case:
        assert ciphertext.hex() == case["ciphertext"]
        assert plaintext.hex() == case["plaintext"]
    else:
        assert ciphertext[:64].hex() == case["ciphertext_head"] and ciphertext[-64:].hex() == case["ciphertext_tail"]
    # other direction: the stored pointer decrypts the recomputed bytes
    assert decrypt_attachment(ciphertext, AttachmentPointer.decode(bytes.fromhex(case["pointer"]))) == plaintext


def _segment_ends(size):
    body, step = size - 12, 65536 + 16
    return [12 + min(i + step, body) for i in range(0, body, step)]


@functools.cache
def _valid_ciphertexts():
    """Every valid case's ciphertext, recomputed and checked against its stored hash."""
    out = {}
    for valid in STREAM_VALID:
        _, ciphertext, _ = _recompute(valid)
        assert hashlib.sha256(ciphertext).hexdigest() == valid["ciphertext_sha256"]
        out[valid["id"]] = ciphertext
    return out


@pytest.mark.parametrize("case", cases("attachment", "stream", "invalid"), ids=lambda c: c["description"])
def test_attachment_invalid(case):
    ciphertexts = _valid_ciphertexts()
    mutated = attachment_gen.apply_mutation(ciphertexts[case["base"]], case["mutation"], ciphertexts)
    p = case["pointer"]
    pointer = AttachmentPointer(bytes.fromhex(p["key"]), bytes.fromhex(p["sha256"]), p["size"], p["content_type"],
                                p["plaintext_size"])
    with pytest.raises(error_class(case["error"])):
        decrypt_attachment(mutated, pointer)


@pytest.mark.parametrize("case", cases("attachment", "pointer"), ids=lambda c: c["description"])
def test_attachment_pointer(case):
    encoded = bytes.fromhex(case["encoded"])
    if case["result"] == "valid":
        pointer = AttachmentPointer.decode(encoded)
        f = case["fields"]
        assert pointer == AttachmentPointer(bytes.fromhex(f["key"]), bytes.fromhex(f["sha256"]), f["size"],
                                            f["content_type"], f["plaintext_size"])
        assert pointer.encode() == encoded
    else:
        with pytest.raises(error_class(case["error"])):
            AttachmentPointer.decode(encoded)


# --- backups ------------------------------------------------------------------------

@pytest.mark.parametrize("case", cases("backup", "recovery_key"), ids=lambda c: c["description"])
def test_recovery_key_text(case):
    if case["result"] == "valid":
        key = RecoveryKey.parse(case["text"])
        assert key.key.hex() == case["key"]
        if "-" in case["text"]:
            assert RecoveryKey(bytes.fromhex(case["key"])).display() == case["text"]
    else:
        with pytest.raises(error_class(case["error"])):
            RecoveryKey.parse(case["text"])


@pytest.mark.parametrize("case", cases("backup", "server"), ids=lambda c: c["description"])
def test_server_backup_vectors(case):
    key = RecoveryKey(bytes.fromhex(case["recovery_key"]))
    blob = bytes.fromhex(case["blob"])
    if case["result"] == "valid":
        contents = BackupContents.decode(bytes.fromhex(case["contents"]))
        assert contents.encode().hex() == case["contents"]
        assert seal_for_server(contents, key, parts_rng(bytes.fromhex(case["nonce"]))) == blob
        assert open_server_backup(blob, key) == contents
    else:
        with pytest.raises(error_class(case["error"])):
            open_server_backup(blob, key)


@pytest.mark.parametrize("case", cases("backup", "local"), ids=lambda c: c["description"])
def test_local_file_vectors(case):
    blob = bytes.fromhex(case["blob"])
    if case["result"] == "valid":
        contents = BackupContents.decode(bytes.fromhex(case["contents"]))
        rng = parts_rng(bytes.fromhex(case["salt"]), bytes.fromhex(case["nonce"]))
        assert export_local_file(contents, case["passphrase"], rng, opslimit=case["opslimit"],
                                 memlimit=case["memlimit"]) == blob
        assert open_local_file(blob, case["passphrase"]) == contents
    else:
        with pytest.raises(error_class(case["error"])):
            open_local_file(blob, case["passphrase"])


# --- verification -------------------------------------------------------------------

@pytest.mark.parametrize("case", cases("safety_number", "safety_number"), ids=lambda c: c["description"])
def test_safety_number_vectors(case):
    a, b = party(case["a"]), party(case["b"])
    assert fingerprint(a).hex() == case["a_fingerprint"] and fingerprint(b).hex() == case["b_fingerprint"]
    assert displayable(fingerprint(a)) == case["a_displayable"]
    assert displayable(fingerprint(b)) == case["b_displayable"]
    assert safety_number(a, b).digits == safety_number(b, a).digits == case["safety_number"]
    assert qr_payload(a, b).hex() == case["qr_shown_by_a"]
    assert compare_scanned(bytes.fromhex(case["qr_shown_by_a"]), b, a).value == "match"


@pytest.mark.parametrize("case", cases("safety_number", "qr_scan"), ids=lambda c: c["description"])
def test_qr_scan_vectors(case):
    payload, scanner, peer = bytes.fromhex(case["payload"]), party(case["scanner"]), party(case["peer"])
    if case["result"] == "valid":
        assert compare_scanned(payload, scanner, peer).value == case["verdict"]
    else:
        with pytest.raises(error_class(case["error"])):
            compare_scanned(payload, scanner, peer)


@pytest.mark.parametrize("case", cases("safety_number", "contact_code"), ids=lambda c: c["description"])
def test_contact_code_vectors(case):
    if case["result"] == "invalid":
        with pytest.raises(error_class(case["error"])):
            ContactCode.parse(case["code"])
    elif "found" in case:
        found = party(case["found"])
        assert ContactCode.parse(case["code"]).matches(found.address, found.master_public_key).value == case["hint"]
    else:
        p = party(case)
        assert str(ContactCode.for_key(p.address, p.master_public_key)) == case["code"]
        assert ContactCode.parse(case["code"]) == ContactCode.for_key(p.address, p.master_public_key)
