"""Prekey upkeep (sans-I/O): what to upload so a device never runs out of prekeys.

Why: a device whose one-time prekeys run out still gets sessions (the signed
prekey is the last resort) but loses their extra forward secrecy, and a signed
prekey that never rotates widens the window a stolen key is useful.  The client
calls ``plan_prekey_upload`` on connect, on ``prekeys_low`` and periodically; the
new private halves are in ``prekeys`` (persist them before uploading).
"""

from __future__ import annotations

from typing import Any

from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore

DAY_MS = 86_400_000
SIGNED_PREKEY_MAX_AGE_MS = 7 * DAY_MS      # rotate the signed prekey weekly
SIGNED_PREKEY_KEEP_MS = 30 * DAY_MS        # keep old ones for delayed initial messages (mailbox TTL)
MAX_KEYS_PER_UPLOAD = 200                  # the server's per-upload limit (PROTOCOL §6)


def plan_prekey_upload(prekeys: PrekeyStore, identity: DeviceIdentity, now_ms: int, one_time_on_server: int,
                       target: int) -> dict[str, Any] | None:
    """``upload_keys`` parameters, or None when nothing is due.

    One-time keys are refilled to ``target`` once fewer than half remain (not one by
    one); the signed prekey is replaced when a week old and old ones pruned after 30 days.
    """
    newest = max(prekeys.signed.values(), key=lambda s: s.key_id, default=None)
    rotate = newest is None or now_ms - newest.created_ms >= SIGNED_PREKEY_MAX_AGE_MS
    missing = max(0, min(MAX_KEYS_PER_UPLOAD, target - one_time_on_server))
    refill = missing > 0 and missing >= target // 2
    if not rotate and not refill:
        return None
    params: dict[str, Any] = {}
    if rotate:
        params["signed_prekey"] = prekeys.new_signed_prekey(identity, now_ms).to_wire()
        prekeys.prune_signed_prekeys(now_ms, SIGNED_PREKEY_KEEP_MS)
    if refill:
        params["one_time_prekeys"] = [k.to_wire() for k in prekeys.new_one_time_prekeys(missing)]
    return params
