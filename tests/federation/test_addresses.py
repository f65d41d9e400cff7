import pytest
from hypothesis import given, strategies as st

from federation.addresses import DeviceAddress, UserAddress, new_device_id, parse_domain
from federation.errors import AddressError, ErrorCode

locals_ = st.from_regex(r"[a-z0-9._=\-]{1,64}", fullmatch=True)
domains = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}(:[1-9][0-9]{0,3})?", fullmatch=True)


@given(locals_, domains)
def test_user_and_device_round_trip(local, domain):
    user = UserAddress.parse(f"{local}@{domain}")
    assert str(user) == f"{local}@{domain}"
    device = user.device(new_device_id())
    assert DeviceAddress.parse(str(device)) == device
    assert device.domain == domain


@given(st.text(max_size=40))
def test_parse_never_raises_anything_but_address_error(text):
    for parse in (UserAddress.parse, DeviceAddress.parse, parse_domain):
        try:
            parse(text)
        except AddressError as exc:
            assert exc.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("text", [
    "alice", "alice@", "@example.org", "Alice@example.org", "alice@Example.org", "a@b@c",
    "alice@example.org:0", "alice@example.org:65536", "alice@example.org:08", "alice@-x.org",
    "alice@exa mple.org", "a" * 65 + "@x.org",
])
def test_bad_user_addresses(text):
    with pytest.raises(AddressError):
        UserAddress.parse(text)


@pytest.mark.parametrize("text", [
    "alice@example.org", "alice@example.org/", "alice@example.org/ABCDEFGHI",
    "alice@example.org/abcdefghij", "alice@example.org/ABCDEFGHI1", "alice@example.org/A/BCDEFGHIJ",
])
def test_bad_device_addresses(text):
    with pytest.raises(AddressError):
        DeviceAddress.parse(text)


def test_port_is_kept():
    assert UserAddress.parse("bob@localhost:8448").domain == "localhost:8448"
