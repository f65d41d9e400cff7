"""Discovery of a remote homeserver and its signing keys (issue 5, item 1; DESIGN §3, §5).

A homeserver publishes ``GET /.well-known/securechat``: its domain, endpoints and
every server key whose validity window has not ended.  Peers fetch it over HTTPS
(plain HTTP only for loopback hosts and explicitly configured test domains), cache
it for an hour, and re-fetch on an unknown key id at most once per domain per
minute, so a peer that rotated is picked up quickly but a stream of forged key ids
cannot make us hammer anyone.

Layers: ``parse_document`` is pure and strict (remote input never crashes us, it
becomes ``DiscoveryError``); ``Discovery`` adds the cache and the httpx fetch, with
httpx exceptions translated once at the boundary (``map_exceptions``) and time
taken from a clock parameter (default ``trio.current_time``, so ``autojump_clock``
drives expiry and the rate limit).  A static map (domain -> base URL or full
document) serves private networks and tests.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, Self, cast
from urllib.parse import SplitResult, urlsplit

import httpx
import trio

from federation.addresses import parse_domain
from federation.errors import AddressError, ErrorCode, ProtocolError

WELL_KNOWN_PATH = "/.well-known/securechat"
DOCUMENT_VERSION = 1
CACHE_TTL_S = 3600.0                 # a fetched document is trusted this long
MIN_REFRESH_INTERVAL_S = 60.0        # at most one fetch per domain per this long on unknown key ids / failures
FETCH_TIMEOUT_S = 10.0               # whole request, connect to last byte
MAX_DOCUMENT_BYTES = 64 * 1024
MAX_SERVER_KEYS = 64
MAX_CACHED_DOMAINS = 10_000
MAX_URL_LENGTH = 2048
PUBLIC_KEY_LEN = 32
_INT64_MAX = (1 << 63) - 1
_KEY_ID = re.compile(r"[\x21-\x7e]{1,64}")
_LOOPBACK = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?")

Clock = Callable[[], float]


class DiscoveryError(ProtocolError):
    """A domain could not be discovered, or served a bad document.

    ``unknown_domain``: nothing answers there (connection refused, no such host, 404).
    ``remote_error``: something answered badly (timeout, 5xx, malformed document).
    Messages are ours, never the remote's text, so they are safe to log and to send.
    """

    code = ErrorCode.REMOTE_ERROR


class ServerKeyError(ProtocolError):
    """A remote server key that cannot vouch for a signature (unknown id, or outside its window)."""

    code = ErrorCode.UNAUTHORIZED


class UnknownServerKey(ServerKeyError):
    """The domain does not publish this key id (even after a refresh)."""


class ServerKeyNotValid(ServerKeyError):
    """The key exists but its validity window does not cover both ts and now."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One published server key: Ed25519 public key and its window ``[valid_from_ms, valid_until_ms)``."""

    key_id: str
    public_key: bytes
    valid_from_ms: int
    valid_until_ms: int

    def valid_at(self, ts_ms: int) -> bool:
        return self.valid_from_ms <= ts_ms < self.valid_until_ms


@dataclass(frozen=True, slots=True)
class Endpoints:
    c2s: str
    http: str
    fed: str | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryDocument:
    domain: str
    endpoints: Endpoints
    server_keys: tuple[VerifyKey, ...]
    version: int = DOCUMENT_VERSION

    def key(self, key_id: str) -> VerifyKey | None:
        for key in self.server_keys:
            if key.key_id == key_id:
                return key
        return None


# --- strict parsing --------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise DiscoveryError(f"discovery document has a duplicate key {name!r:.40}")
        out[name] = value
    return out


def _reject_constant(name: str) -> Any:
    raise DiscoveryError("discovery document contains NaN or Infinity")


def _get(obj: Mapping[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise DiscoveryError(f"discovery document field {name!r} is missing or not a {kind.__name__}")
    return value


def _url(obj: Mapping[str, Any], name: str, schemes: tuple[str, ...], *, optional: bool = False) -> str | None:
    value: str | None = _get(obj, name, str, optional=optional)
    if value is None:
        return None
    parts = _split_url(value) if len(value) <= MAX_URL_LENGTH and value.isascii() else None
    if parts is None or parts.scheme not in schemes or not parts.netloc:
        raise DiscoveryError(f"discovery document endpoint {name!r} is not a {'/'.join(schemes)} URL")
    return value


def _split_url(value: str) -> SplitResult | None:
    try:
        return urlsplit(value)
    except ValueError:      # e.g. an unclosed IPv6 bracket
        return None


def _ms(entry: Mapping[str, Any], name: str) -> int:
    value: int = _get(entry, name, int)
    if not 0 <= value <= _INT64_MAX:
        raise DiscoveryError(f"server key field {name!r} is out of range")
    return value


def _verify_key(entry: Any) -> VerifyKey:
    if not isinstance(entry, dict):
        raise DiscoveryError("each server key must be an object")
    key_id: str = _get(entry, "key_id", str)
    if not _KEY_ID.fullmatch(key_id):
        raise DiscoveryError("server key id must be 1-64 printable ASCII characters")
    encoded: str = _get(entry, "public_key", str)
    try:
        public_key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise DiscoveryError(f"server key {key_id} has a public key that is not base64") from None
    if len(public_key) != PUBLIC_KEY_LEN or base64.b64encode(public_key).decode() != encoded:
        raise DiscoveryError(f"server key {key_id} must be 32 bytes in canonical base64")
    valid_from, valid_until = _ms(entry, "valid_from_ms"), _ms(entry, "valid_until_ms")
    if valid_from >= valid_until:
        raise DiscoveryError(f"server key {key_id} has an empty validity window")
    return VerifyKey(key_id, public_key, valid_from, valid_until)


def parse_document(data: bytes | str | Mapping[str, Any], domain: str) -> DiscoveryDocument:
    """Parse the JSON served at ``/.well-known/securechat`` for ``domain``; ``DiscoveryError`` if bad.

    Unknown fields are ignored (additive changes within version 1); everything we use is checked
    for type, range and encoding, and the document must name the domain it was fetched for.
    """
    if isinstance(data, Mapping):
        raw: Any = data
    else:
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            raw = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise DiscoveryError(f"discovery document of {domain} is not valid JSON") from None
    if not isinstance(raw, Mapping):
        raise DiscoveryError(f"discovery document of {domain} is not a JSON object")
    version = _get(raw, "version", int)
    if version != DOCUMENT_VERSION:
        raise DiscoveryError(f"discovery document of {domain} has unsupported version {version}")
    if _get(raw, "domain", str) != domain:
        raise DiscoveryError(f"discovery document fetched for {domain} names another domain")
    endpoints_raw = _get(raw, "endpoints", dict)
    endpoints = Endpoints(
        c2s=str(_url(endpoints_raw, "c2s", ("ws", "wss"))),
        http=str(_url(endpoints_raw, "http", ("http", "https"))),
        fed=_url(endpoints_raw, "fed", ("ws", "wss", "http", "https"), optional=True),
    )
    keys_raw = _get(raw, "server_keys", list)
    if len(keys_raw) > MAX_SERVER_KEYS:
        raise DiscoveryError(f"discovery document of {domain} lists more than {MAX_SERVER_KEYS} keys")
    keys = tuple(_verify_key(entry) for entry in keys_raw)
    if len({k.key_id for k in keys}) != len(keys):
        raise DiscoveryError(f"discovery document of {domain} repeats a key id")
    return DiscoveryDocument(domain, endpoints, keys, version)


# --- URLs and the HTTP rule ------------------------------------------------------------------


def is_loopback(host_port: str) -> bool:
    """``localhost``, ``127.0.0.1`` or ``[::1]``, each with an optional port."""
    return _LOOPBACK.fullmatch(host_port) is not None


def check_target_domain(domain: str) -> str:
    """A domain we may look up: a valid ``host[:port]``, or the IPv6 loopback."""
    if isinstance(domain, str) and domain.startswith("[") and is_loopback(domain):
        return domain       # the IPv6 loopback, which parse_domain does not accept
    try:
        return parse_domain(domain)
    except AddressError as exc:
        raise DiscoveryError(exc.message, code=ErrorCode.UNKNOWN_DOMAIN) from None


def discovery_url(domain: str, base_url: str | None = None, *,
                  insecure_domains: frozenset[str] = frozenset()) -> str:
    """Where to fetch ``domain``'s document: HTTPS, or plain HTTP for loopback / configured test domains."""
    if base_url is None:
        scheme = "http" if is_loopback(domain) or domain in insecure_domains else "https"
        return f"{scheme}://{domain}{WELL_KNOWN_PATH}"
    parts = _split_url(base_url)
    if parts is None:
        raise DiscoveryError(f"static discovery entry for {domain} is not a URL", code=ErrorCode.UNKNOWN_DOMAIN)
    if parts.scheme == "http" and not (is_loopback(parts.netloc) or domain in insecure_domains):
        raise DiscoveryError(f"plain HTTP is only allowed for loopback hosts and configured test domains"
                             f" ({domain})", code=ErrorCode.UNKNOWN_DOMAIN)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise DiscoveryError(f"static discovery entry for {domain} is not an http(s) base URL",
                             code=ErrorCode.UNKNOWN_DOMAIN)
    return base_url.rstrip("/") + WELL_KNOWN_PATH


@contextmanager
def map_exceptions(domain: str) -> Iterator[None]:
    """Translate httpx's exceptions into ``DiscoveryError`` once, here (httpcore's ``map_exceptions``)."""
    try:
        yield
    except httpx.ConnectError as exc:
        raise DiscoveryError(f"cannot connect to {domain}", code=ErrorCode.UNKNOWN_DOMAIN) from exc
    except httpx.TimeoutException as exc:
        raise DiscoveryError(f"discovery of {domain} timed out") from exc
    except httpx.HTTPError as exc:
        raise DiscoveryError(f"discovery of {domain} failed ({type(exc).__name__})") from exc


# --- the cached fetcher ----------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    document: DiscoveryDocument | None      # last good document, if still trusted
    failure: tuple[ErrorCode, str] | None   # last fetch failed: what to raise until the next attempt
    fetched_at: float                        # last fetch attempt (success or failure)
    expires_at: float                        # document (or failure) answered from cache until then

    def result(self) -> DiscoveryDocument:
        if self.failure is not None:
            code, message = self.failure
            raise DiscoveryError(message, code=code)
        if self.document is None:
            raise DiscoveryError("no discovery document")  # unreachable by construction
        return self.document


StaticEntry = str | DiscoveryDocument | Mapping[str, Any]


class Discovery:
    """Looks up remote homeservers' discovery documents and verifies their key ids (synapse's KeyFetcher).

    ``static`` maps a domain to a base URL (fetched like any other, cached) or to a full document
    (never fetched).  ``insecure_domains`` may be fetched over plain HTTP.  Use as
    ``async with Discovery(...) as discovery`` or call ``aclose``.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None,
                 static: Mapping[str, StaticEntry] | None = None,
                 insecure_domains: frozenset[str] | set[str] = frozenset(),
                 clock: Clock = trio.current_time, cache_ttl_s: float = CACHE_TTL_S,
                 min_refresh_interval_s: float = MIN_REFRESH_INTERVAL_S,
                 timeout_s: float = FETCH_TIMEOUT_S, max_cached_domains: int = MAX_CACHED_DOMAINS) -> None:
        self._http = httpx.AsyncClient(transport=transport, follow_redirects=False,
                                       timeout=httpx.Timeout(timeout_s))
        self._insecure = frozenset(insecure_domains)
        self._clock = clock
        self._ttl = cache_ttl_s
        self._min_refresh = min_refresh_interval_s
        self._timeout = timeout_s
        self._max_cached = max_cached_domains
        self._static_docs: dict[str, DiscoveryDocument] = {}
        self._static_urls: dict[str, str] = {}
        for domain, entry in (static or {}).items():
            domain = check_target_domain(domain)
            if isinstance(entry, str):
                self._static_urls[domain] = discovery_url(domain, entry, insecure_domains=self._insecure)
            elif isinstance(entry, DiscoveryDocument):
                if entry.domain != domain:
                    raise DiscoveryError(f"static discovery document for {domain} names another domain")
                self._static_docs[domain] = entry
            else:
                self._static_docs[domain] = parse_document(entry, domain)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, trio.Event] = {}
        self.fetches = 0                      # network fetches attempted (for tests and metrics)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def url_for(self, domain: str) -> str:
        domain = check_target_domain(domain)
        return self._static_urls.get(domain) or discovery_url(domain, insecure_domains=self._insecure)

    async def lookup(self, domain: str) -> DiscoveryDocument:
        """The domain's document: from the static map, from the cache until it expires, else fetched."""
        domain = check_target_domain(domain)
        if domain in self._static_docs:
            return self._static_docs[domain]
        return await self._cached_or_fetch(domain, lambda entry, now: now < entry.expires_at)

    async def verify_key(self, domain: str, key_id: str, ts_ms: int, now_ms: int) -> bytes:
        """The public key ``key_id`` of ``domain`` if it is valid at both ``ts_ms`` and ``now_ms``.

        An unknown key id triggers one re-fetch, unless the domain was fetched less than a minute
        ago; ``UnknownServerKey`` / ``ServerKeyNotValid`` (code ``unauthorized``) otherwise.
        """
        domain = check_target_domain(domain)
        document = await self.lookup(domain)
        key = document.key(key_id)
        if key is None and domain not in self._static_docs:
            recent = self._min_refresh
            document = await self._cached_or_fetch(domain, lambda entry, now: now - entry.fetched_at < recent)
            key = document.key(key_id)
        if key is None:
            raise UnknownServerKey(f"{domain} publishes no server key {key_id!r:.80}")
        if not (key.valid_at(ts_ms) and key.valid_at(now_ms)):
            raise ServerKeyNotValid(f"server key {key_id} of {domain} is not valid at both ts and now")
        return key.public_key

    async def _cached_or_fetch(self, domain: str, usable: Callable[[_Entry, float], bool]) -> DiscoveryDocument:
        """Answer from the cache if ``usable``, else fetch; one fetch per domain at a time."""
        while True:
            entry = self._cache.get(domain)
            if entry is not None and usable(entry, self._clock()):
                return entry.result()
            inflight = self._inflight.get(domain)
            if inflight is None:
                break
            await inflight.wait()   # someone else is fetching: use their answer
        done = self._inflight[domain] = trio.Event()
        try:
            return await self._fetch_into_cache(domain)
        finally:
            del self._inflight[domain]
            done.set()

    async def _fetch_into_cache(self, domain: str) -> DiscoveryDocument:
        previous = self._cache.get(domain)
        try:
            document = await self._download(domain)
        except DiscoveryError as exc:
            now = self._clock()
            if previous is not None and previous.document is not None and now < previous.expires_at:
                # A failed refresh must not poison a document we still trust.
                previous.fetched_at = now
            else:
                self._store(domain, _Entry(None, (exc.code, exc.message), now, now + self._min_refresh))
            raise
        now = self._clock()
        self._store(domain, _Entry(document, None, now, now + self._ttl))
        return document

    def _store(self, domain: str, entry: _Entry) -> None:
        self._cache[domain] = entry
        self._cache.move_to_end(domain)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)

    async def _download(self, domain: str) -> DiscoveryDocument:
        url = self.url_for(domain)
        self.fetches += 1
        body = b""
        with trio.move_on_after(self._timeout) as deadline, map_exceptions(domain):
            async with self._http.stream("GET", url, headers={"accept": "application/json"}) as response:
                if response.status_code == 404:
                    raise DiscoveryError(f"{domain} serves no discovery document",
                                         code=ErrorCode.UNKNOWN_DOMAIN)
                if response.status_code != 200:
                    raise DiscoveryError(f"discovery of {domain} failed with HTTP {response.status_code}")
                chunks = []
                size = 0
                # aiter_bytes() is an async generator (it has aclose()); httpx annotates it AsyncIterator.
                chunk_iter = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                async with aclosing(chunk_iter) as stream:   # closed even when we stop early
                    async for chunk in stream:
                        size += len(chunk)
                        if size > MAX_DOCUMENT_BYTES:
                            raise DiscoveryError(f"discovery document of {domain} exceeds {MAX_DOCUMENT_BYTES}"
                                                 " bytes")
                        chunks.append(chunk)
                body = b"".join(chunks)
        if deadline.cancelled_caught:
            raise DiscoveryError(f"discovery of {domain} timed out")
        return parse_document(body, domain)
