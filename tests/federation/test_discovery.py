"""Discovery of remote homeservers: strict parsing, the HTTP rule, caching, key refresh and error mapping."""

from __future__ import annotations

import base64
import copy
import json

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.discovery import (
    MAX_DOCUMENT_BYTES,
    Discovery,
    DiscoveryDocument,
    DiscoveryError,
    Endpoints,
    ServerKeyNotValid,
    UnknownServerKey,
    VerifyKey,
    check_target_domain,
    discovery_url,
    parse_document,
)
from federation.errors import ErrorCode, ProtocolError

DOMAIN = "example.org"
PUB_A, PUB_B = bytes(range(32)), bytes(range(32, 64))


def key_json(key_id: str = "ed25519:AAAA", pub: bytes = PUB_A, start: int = 0, end: int = 10**13) -> dict:
    return {"key_id": key_id, "public_key": base64.b64encode(pub).decode(), "valid_from_ms": start,
            "valid_until_ms": end}


def doc_json(domain: str = DOMAIN, keys: list[dict] | None = None) -> dict:
    """The shape ``homeserver.http_api.discovery_document`` serves today."""
    return {"domain": domain, "version": 1,
            "endpoints": {"c2s": f"wss://{domain}/c2s", "http": f"https://{domain}"},
            "server_keys": [key_json()] if keys is None else keys}


class FakeServer:
    """An ``httpx.MockTransport`` handler serving one mutable document per domain, counting requests."""

    def __init__(self, docs: dict[str, dict] | None = None) -> None:
        self.docs = docs if docs is not None else {DOMAIN: doc_json()}
        self.urls: list[str] = []
        self.status = 200
        self.body: bytes | None = None
        self.error: Exception | None = None
        self.delay = 0.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        if self.delay:
            await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        if self.body is not None:
            return httpx.Response(self.status, content=self.body)
        doc = self.docs.get(request.url.host)
        if doc is None or request.url.path != "/.well-known/securechat":
            return httpx.Response(404, json={"error": {"code": "not_found"}})
        return httpx.Response(self.status, json=doc)


def discovery(server: FakeServer, **kwargs) -> Discovery:
    return Discovery(transport=httpx.MockTransport(server), **kwargs)


# --- parsing ---------------------------------------------------------------------------------


def test_parse_the_document_served_today():
    raw = doc_json(keys=[key_json(), key_json("ed25519:BBBB", PUB_B, 5, 9)])
    raw["endpoints"]["fed"] = "wss://example.org/fed"
    raw["future_field"] = [1.5, None]            # additive changes within version 1 are ignored
    doc = parse_document(json.dumps(raw).encode(), DOMAIN)
    endpoints = Endpoints("wss://example.org/c2s", "https://example.org", "wss://example.org/fed")
    keys = (VerifyKey("ed25519:AAAA", PUB_A, 0, 10**13), VerifyKey("ed25519:BBBB", PUB_B, 5, 9))
    assert doc == DiscoveryDocument(DOMAIN, endpoints, keys)
    assert doc.key("ed25519:BBBB").public_key == PUB_B and doc.key("nope") is None
    assert parse_document(raw, DOMAIN) == doc == parse_document(json.dumps(raw), DOMAIN)
    assert parse_document(doc_json(keys=[]), DOMAIN).server_keys == ()


def test_valid_at_is_half_open():
    key = VerifyKey("k", PUB_A, 1000, 2000)
    assert [key.valid_at(t) for t in (999, 1000, 1999, 2000)] == [False, True, True, False]


def _mutate(path: tuple, value):
    def apply(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        target = doc
        for step in path[:-1]:
            target = target[step]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return doc
    return apply


BAD_DOCUMENTS = {
    "version missing": _mutate(("version",), KeyError),
    "version 2": _mutate(("version",), 2),
    "version as bool": _mutate(("version",), True),
    "other domain": _mutate(("domain",), "example.net"),
    "domain not a string": _mutate(("domain",), 7),
    "endpoints missing": _mutate(("endpoints",), KeyError),
    "c2s missing": _mutate(("endpoints", "c2s"), KeyError),
    "c2s over http": _mutate(("endpoints", "c2s"), "http://example.org/c2s"),
    "http endpoint no host": _mutate(("endpoints", "http"), "https://"),
    "fed not a URL": _mutate(("endpoints", "fed"), "example.org"),
    "c2s with broken IPv6 host": _mutate(("endpoints", "c2s"), "wss://[::1/c2s"),
    "keys not a list": _mutate(("server_keys",), {"a": 1}),
    "key not an object": _mutate(("server_keys", 0), "ed25519:AAAA"),
    "key id with space": _mutate(("server_keys", 0, "key_id"), "ed25519 A"),
    "key id empty": _mutate(("server_keys", 0, "key_id"), ""),
    "public key not base64": _mutate(("server_keys", 0, "public_key"), "!!!!"),
    "public key 31 bytes": _mutate(("server_keys", 0, "public_key"), base64.b64encode(bytes(31)).decode()),
    "public key hex": _mutate(("server_keys", 0, "public_key"), PUB_A.hex()),
    "public key non-canonical base64": _mutate(("server_keys", 0, "public_key"),
                                               base64.b64encode(PUB_A).decode()[:-2] + "F="),
    "valid_from float": _mutate(("server_keys", 0, "valid_from_ms"), 1.0),
    "valid_until bool": _mutate(("server_keys", 0, "valid_until_ms"), True),
    "negative time": _mutate(("server_keys", 0, "valid_from_ms"), -1),
    "time over int64": _mutate(("server_keys", 0, "valid_until_ms"), 1 << 63),
    "empty window": _mutate(("server_keys", 0, "valid_until_ms"), 0),
    "repeated key id": _mutate(("server_keys",), [key_json(), key_json(pub=PUB_B)]),
    "too many keys": _mutate(("server_keys",), [key_json(f"k{i}") for i in range(65)]),
}


@pytest.mark.parametrize("mutate", BAD_DOCUMENTS.values(), ids=BAD_DOCUMENTS.keys())
def test_bad_documents_raise_discovery_error(mutate):
    with pytest.raises(DiscoveryError) as info:
        parse_document(json.dumps(mutate(doc_json())).encode(), DOMAIN)
    assert info.value.code is ErrorCode.REMOTE_ERROR and isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"[]", b"null", b"{", b'{"version": NaN}',
                                  b'{"version": 1, "version": 1}', b"[" * 100_000])
def test_bad_json_raises_discovery_error(body):
    with pytest.raises(DiscoveryError):
        parse_document(body, DOMAIN)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from([("version",), ("domain",), ("endpoints",), ("endpoints", "c2s"), ("server_keys",),
                             ("server_keys", 0), ("server_keys", 0, "public_key"),
                             ("server_keys", 0, "valid_from_ms")]),
       value=json_values)
def test_arbitrary_field_values_never_crash(path, value):
    try:
        parse_document(json.dumps(_mutate(path, value)(doc_json())), DOMAIN)
    except DiscoveryError:
        pass


# --- the HTTP rule ---------------------------------------------------------------------------


def test_https_except_loopback_and_configured_test_domains():
    assert discovery_url("example.org") == "https://example.org/.well-known/securechat"
    assert discovery_url("example.org:8449") == "https://example.org:8449/.well-known/securechat"
    for host in ("localhost", "localhost:8449", "127.0.0.1", "127.0.0.1:8449", "[::1]", "[::1]:8449"):
        assert discovery_url(host) == f"http://{host}/.well-known/securechat"
    assert discovery_url("localhost.evil.com").startswith("https://")
    assert discovery_url("127.0.0.1.evil.com").startswith("https://")
    assert discovery_url("test.internal", insecure_domains=frozenset({"test.internal"})).startswith("http://")
    assert discovery_url("example.org", "http://127.0.0.1:9/") == "http://127.0.0.1:9/.well-known/securechat"
    assert discovery_url("example.org", "https://10.0.0.1/sc") == "https://10.0.0.1/sc/.well-known/securechat"
    with pytest.raises(DiscoveryError):
        discovery_url("example.org", "http://10.0.0.1")
    with pytest.raises(DiscoveryError):
        discovery_url("example.org", "ftp://127.0.0.1")
    assert discovery_url("example.org", "http://10.0.0.1",
                         insecure_domains=frozenset({"example.org"})).startswith("http://10.0.0.1/")
    with pytest.raises(DiscoveryError):
        discovery_url("example.org", "http://[::1")
    for bad in ("Example.org", "a..b", "", "[::2]", "example.org:0", "localhost:99999", "[::1]:x"):
        with pytest.raises(DiscoveryError) as info:
            check_target_domain(bad)
        assert info.value.code is ErrorCode.UNKNOWN_DOMAIN


async def test_fetch_uses_https_and_loopback_http():
    server = FakeServer({DOMAIN: doc_json(), "localhost": doc_json("localhost")})
    async with discovery(server) as disc:
        assert (await disc.lookup(DOMAIN)).domain == DOMAIN
        assert (await disc.lookup("localhost")).domain == "localhost"
    assert server.urls == ["https://example.org/.well-known/securechat", "http://localhost/.well-known/securechat"]


# --- caching, refresh, static map ------------------------------------------------------------


async def test_cached_for_an_hour_then_refetched(autojump_clock):
    server = FakeServer()
    async with discovery(server) as disc:
        first = await disc.lookup(DOMAIN)
        await trio.sleep(3599)
        assert await disc.lookup(DOMAIN) is first and disc.fetches == 1
        await trio.sleep(2)
        await disc.lookup(DOMAIN)
        assert disc.fetches == 2


async def test_concurrent_lookups_share_one_fetch(autojump_clock):
    server = FakeServer()
    server.delay = 1.0
    results = []
    async with discovery(server) as disc:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(lambda: _append(results, disc.lookup(DOMAIN)))
        assert disc.fetches == 1 and len(results) == 5 and len({id(r) for r in results}) == 1


async def _append(results, awaitable):
    results.append(await awaitable)


async def test_unknown_key_id_refreshes_at_most_once_per_minute(autojump_clock):
    server = FakeServer()
    async with discovery(server) as disc:
        assert await disc.verify_key(DOMAIN, "ed25519:AAAA", 5, 5) == PUB_A
        # fetched just now: an unknown key id does not trigger another fetch yet
        with pytest.raises(UnknownServerKey) as info:
            await disc.verify_key(DOMAIN, "ed25519:BBBB", 5, 5)
        assert info.value.code is ErrorCode.UNAUTHORIZED and disc.fetches == 1
        await trio.sleep(61)
        for _ in range(10):                            # a flood of unknown ids: one refresh
            with pytest.raises(UnknownServerKey):
                await disc.verify_key(DOMAIN, "ed25519:BBBB", 5, 5)
            await trio.sleep(5)
        assert disc.fetches == 2
        # the peer rotates; a minute after the last refresh the new key is picked up
        server.docs[DOMAIN] = doc_json(keys=[key_json(), key_json("ed25519:BBBB", PUB_B)])
        await trio.sleep(11)
        assert await disc.verify_key(DOMAIN, "ed25519:BBBB", 5, 5) == PUB_B
        assert disc.fetches == 3
        assert await disc.verify_key(DOMAIN, "ed25519:AAAA", 5, 5) == PUB_A   # old key still verifies
        assert disc.fetches == 3


async def test_key_must_be_valid_at_ts_and_now():
    server = FakeServer({DOMAIN: doc_json(keys=[key_json(start=1000, end=2000)])})
    async with discovery(server) as disc:
        assert await disc.verify_key(DOMAIN, "ed25519:AAAA", 1000, 1999) == PUB_A
        for ts, now in ((999, 1500), (1500, 2000), (2000, 2000), (500, 2500)):
            with pytest.raises(ServerKeyNotValid) as info:
                await disc.verify_key(DOMAIN, "ed25519:AAAA", ts, now)
            assert info.value.code is ErrorCode.UNAUTHORIZED
        assert disc.fetches == 1                       # a known but expired key is no reason to refetch


async def test_static_map(autojump_clock):
    static_doc = parse_document(doc_json("private.lan"), "private.lan")
    server = FakeServer({"127.0.0.1": doc_json("via.url"), DOMAIN: doc_json()})
    async with discovery(server, static={"private.lan": static_doc, "raw.lan": doc_json("raw.lan"),
                                         "via.url": "http://127.0.0.1:8449"}) as disc:
        assert await disc.lookup("private.lan") is static_doc
        with pytest.raises(UnknownServerKey):
            await disc.verify_key("private.lan", "ed25519:ZZZZ", 5, 5)
        await trio.sleep(3600 * 5)
        assert await disc.verify_key("raw.lan", "ed25519:AAAA", 5, 5) == PUB_A
        assert disc.fetches == 0                       # full documents are never fetched
        assert (await disc.lookup("via.url")).domain == "via.url"
        assert server.urls == ["http://127.0.0.1:8449/.well-known/securechat"]
    with pytest.raises(DiscoveryError):
        Discovery(static={"example.org": "http://10.1.2.3"})     # plain HTTP off loopback, not configured
    with pytest.raises(DiscoveryError):
        Discovery(static={"a.lan": static_doc})                   # document of another domain
    with pytest.raises(DiscoveryError):
        Discovery(static={"a.lan": {"version": 1}})               # bad documents fail at configuration
    async with Discovery(static={"a.lan": "http://10.1.2.3"}, insecure_domains={"a.lan"}) as disc:
        assert disc.url_for("a.lan") == "http://10.1.2.3/.well-known/securechat"


# --- failures --------------------------------------------------------------------------------


FAILURES = {
    "connect error": (httpx.ConnectError("refused"), None, None, ErrorCode.UNKNOWN_DOMAIN),
    "read timeout": (httpx.ReadTimeout("slow"), None, None, ErrorCode.REMOTE_ERROR),
    "protocol error": (httpx.RemoteProtocolError("junk"), None, None, ErrorCode.REMOTE_ERROR),
    "404": (None, 404, b"{}", ErrorCode.UNKNOWN_DOMAIN),
    "500": (None, 500, b"{}", ErrorCode.REMOTE_ERROR),
    "redirect not followed": (None, 301, b"", ErrorCode.REMOTE_ERROR),
    "not JSON": (None, 200, b"<html>", ErrorCode.REMOTE_ERROR),
    "too large": (None, 200, b" " * (MAX_DOCUMENT_BYTES + 1), ErrorCode.REMOTE_ERROR),
}


@pytest.mark.parametrize("error,status,body,code", FAILURES.values(), ids=FAILURES.keys())
async def test_fetch_failures_are_mapped(error, status, body, code):
    server = FakeServer()
    server.error, server.body = error, body
    if status is not None:
        server.status = status
    async with discovery(server) as disc:
        with pytest.raises(DiscoveryError) as info:
            await disc.lookup(DOMAIN)
    assert info.value.code is code
    assert "refused" not in info.value.message and "junk" not in info.value.message   # never the remote's text


async def test_whole_fetch_has_a_deadline(autojump_clock):
    server = FakeServer()
    server.delay = 100
    async with discovery(server, timeout_s=10) as disc:
        start = trio.current_time()
        with pytest.raises(DiscoveryError, match="timed out"):
            await disc.lookup(DOMAIN)
        assert trio.current_time() - start == pytest.approx(10)


async def test_failure_is_remembered_for_a_minute(autojump_clock):
    server = FakeServer()
    server.error = httpx.ConnectError("down")
    async with discovery(server) as disc:
        for _ in range(3):
            with pytest.raises(DiscoveryError):
                await disc.lookup(DOMAIN)
        assert disc.fetches == 1
        server.error = None
        await trio.sleep(61)
        assert (await disc.lookup(DOMAIN)).domain == DOMAIN
        assert disc.fetches == 2


async def test_failed_refresh_keeps_the_trusted_document(autojump_clock):
    server = FakeServer()
    async with discovery(server) as disc:
        await disc.lookup(DOMAIN)
        server.status = 503
        await trio.sleep(61)
        with pytest.raises(DiscoveryError) as info:
            await disc.verify_key(DOMAIN, "ed25519:BBBB", 5, 5)
        assert info.value.code is ErrorCode.REMOTE_ERROR
        assert await disc.verify_key(DOMAIN, "ed25519:AAAA", 5, 5) == PUB_A   # still cached
        with pytest.raises(UnknownServerKey):                                   # no second refresh yet
            await disc.verify_key(DOMAIN, "ed25519:BBBB", 5, 5)
        assert disc.fetches == 2


async def test_cache_is_bounded(autojump_clock):
    server = FakeServer({f"d{i}.org": doc_json(f"d{i}.org") for i in range(5)})
    async with discovery(server, max_cached_domains=3) as disc:
        for i in range(5):
            await disc.lookup(f"d{i}.org")
        await disc.lookup("d4.org")
        assert disc.fetches == 5
        await disc.lookup("d0.org")                    # evicted: fetched again
        assert disc.fetches == 6
