"""Pieces every federation handler shares: the server's own address, the refusals for
domains we do not federate with, and the keys of other servers (resolved before a
synchronous ``verify_*`` call needs them).
"""

from __future__ import annotations

from collections.abc import Callable

from federation import s2s
from federation.discovery import Discovery, ServerKeyError, VerifyKey
from federation.errors import ErrorCode, RequestRejected

SERVER_LOCALPART = "=server"          # sender/recipient of server-originated envelopes

Rng = Callable[[int], bytes]


def server_address(domain: str) -> str:
    """The reserved address a homeserver uses for envelopes it originates itself."""
    return f"{SERVER_LOCALPART}@{domain}"


class FederationDisabled(RequestRejected):
    """A remote user or device on a server that does not federate: to the client, an unknown domain."""

    code = ErrorCode.UNKNOWN_DOMAIN


class DomainNotPermitted(RequestRejected):
    code = ErrorCode.FORBIDDEN


# --- keys of other servers -----------------------------------------------------------------


async def _fetch_key(discovery: Discovery, domain: str, key_id: str) -> VerifyKey | None:
    """The origin's published key ``key_id``; an unknown id triggers one rate-limited refresh."""
    key = (await discovery.lookup(domain)).key(key_id)
    if key is None:
        try:
            await discovery.verify_key(domain, key_id, 0, 0)
        except ServerKeyError:
            pass
        key = (await discovery.lookup(domain)).key(key_id)
    return key


async def key_lookup_for(discovery: Discovery, domain: str, key_id: str) -> s2s.KeyLookup:
    """A synchronous ``KeyLookup`` for ``verify_transaction``/``verify_request``, resolved now."""
    key = await _fetch_key(discovery, domain, key_id)

    def lookup(origin: str, wanted: str) -> tuple[bytes, int, int]:
        if key is None or origin != domain or wanted != key_id:
            raise LookupError(wanted)
        return key.public_key, key.valid_from_ms, key.valid_until_ms

    return lookup
