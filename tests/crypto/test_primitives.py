"""``hmac_sha256`` keeps the GIL for small inputs (``hmac.new``) and gives ``hmac.digest``'s bytes."""

import hmac

from hypothesis import given
from hypothesis import strategies as st

from clientsdk.crypto import primitives


@given(st.binary(max_size=100), st.binary(max_size=5000))
def test_hmac_sha256_equals_the_one_shot_digest(key, data):
    assert primitives.hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


def test_hmac_sha256_rfc4231_case_2():
    tag = primitives.hmac_sha256(b"Jefe", b"what do ya want for nothing?")
    assert tag.hex() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
