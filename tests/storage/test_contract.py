"""One contract suite, run against the SQL repositories and the in-memory fake
(as trio runs ``check_two_way_stream`` against every stream)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import trio

from federation.errors import ErrorCode
from homeserver.storage import (
    AccountExists,
    ClaimedBundle,
    DeviceExists,
    DeviceListConflict,
    DeviceState,
    DuplicatePrekey,
    InviteExists,
    InviteInvalid,
    MemoryStorage,
    SqlStorage,
    Storage,
    UnknownDevice,
    open_storage,
)

CLAIM_TTL = 10_000
TTL = 1_000
ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path, nursery) -> AsyncIterator[Storage]:
    store: MemoryStorage | SqlStorage
    if request.param == "memory":
        store = MemoryStorage(claimed_ttl_ms=CLAIM_TTL)
    else:
        store = await open_storage(f"sqlite:///{tmp_path}/contract.db", nursery,
                                   claimed_ttl_ms=CLAIM_TTL)
    yield store
    await store.aclose()


def token_hash(n: int) -> bytes:
    return hashlib.sha256(b"invite-token-%d" % n).digest()


async def active_device(storage: Storage, user: str = ALICE, device_id: str = "DEV1",
                        *, signed: bool = True, pq_last_resort: bool = True) -> None:
    await storage.devices.add_device(user, device_id, b"I" * 32, DeviceState.ACTIVE, 1)
    if signed:
        await storage.devices.set_signed_prekey(user, device_id, 1, b"spk-1", 1)
    if pq_last_resort:
        await storage.devices.add_pq_prekeys(user, device_id, [(100, True, b"pq-last")], 1)


# --- accounts ---------------------------------------------------------------------------------


async def test_account_create_get_list_disable(storage: Storage) -> None:
    assert await storage.accounts.get_account(ALICE) is None
    await storage.accounts.create_account(BOB, "hash-b", b"B" * 32, 20)
    await storage.accounts.create_account(ALICE, "hash-a", b"A" * 32, 10)
    alice = await storage.accounts.get_account(ALICE)
    assert alice is not None
    assert (alice.user, alice.password_hash, alice.master_key, alice.disabled, alice.created_ms) \
        == (ALICE, "hash-a", b"A" * 32, False, 10)
    assert [a.user for a in await storage.accounts.list_accounts()] == [ALICE, BOB]
    assert await storage.accounts.set_disabled(ALICE, True) is True
    assert (await storage.accounts.get_account(ALICE)).disabled is True  # type: ignore[union-attr]
    assert await storage.accounts.set_disabled(ALICE, False) is True
    assert (await storage.accounts.get_account(ALICE)).disabled is False  # type: ignore[union-attr]
    assert await storage.accounts.set_disabled("nobody@example.org", True) is False


async def test_account_exists(storage: Storage) -> None:
    await storage.accounts.create_account(ALICE, "h", b"A" * 32, 1)
    with pytest.raises(AccountExists) as info:
        await storage.accounts.create_account(ALICE, "other", b"X" * 32, 2)
    assert info.value.code == ErrorCode.CONFLICT
    assert (await storage.accounts.get_account(ALICE)).password_hash == "h"  # type: ignore[union-attr]


async def test_invite_create_list_revoke(storage: Storage) -> None:
    invite = await storage.accounts.create_invite(token_hash(1), 5, 1_000, 2, "for the team")
    assert invite.invite_id == token_hash(1).hex()[:12]
    assert (invite.created_ms, invite.expires_ms, invite.uses_left, invite.note, invite.revoked) \
        == (5, 1_000, 2, "for the team", False)
    second = await storage.accounts.create_invite(token_hash(2), 6, 1_000, 1, "")
    assert await storage.accounts.list_invites() == [invite, second]
    assert await storage.accounts.revoke_invite(invite.invite_id) is True
    assert (await storage.accounts.list_invites())[0].revoked is True
    assert await storage.accounts.revoke_invite("000000000000") is False
    with pytest.raises(InviteExists):
        await storage.accounts.create_invite(token_hash(1), 7, 1_000, 1, "again")
    with pytest.raises(ValueError):
        await storage.accounts.create_invite(token_hash(3), 7, 1_000, 0, "no uses")


async def test_invite_is_consumed_with_the_account(storage: Storage) -> None:
    invite = await storage.accounts.create_invite(token_hash(1), 0, 1_000, 2, "")
    await storage.accounts.create_account("a@example.org", "h", b"A" * 32, 10, token_hash(1))
    assert (await storage.accounts.list_invites())[0].uses_left == 1
    # a taken name does not use up the invite (its savepoint rolls back)
    with pytest.raises(AccountExists):
        await storage.accounts.create_account("a@example.org", "h", b"A" * 32, 11, token_hash(1))
    assert (await storage.accounts.list_invites())[0].uses_left == 1
    await storage.accounts.create_account("b@example.org", "h", b"B" * 32, 12, token_hash(1))
    assert (await storage.accounts.list_invites())[0].uses_left == 0
    with pytest.raises(InviteInvalid) as info:
        await storage.accounts.create_account("c@example.org", "h", b"C" * 32, 13, token_hash(1))
    assert info.value.code == ErrorCode.UNAUTHORIZED
    assert await storage.accounts.get_account("c@example.org") is None
    assert invite.invite_id == (await storage.accounts.list_invites())[0].invite_id


@pytest.mark.parametrize("case", ["unknown", "expired", "revoked"])
async def test_invalid_invites(storage: Storage, case: str) -> None:
    invite = await storage.accounts.create_invite(token_hash(1), 0, 100, 5, "")
    now, used = 50, token_hash(1)
    if case == "unknown":
        used = token_hash(9)
    elif case == "expired":
        now = 100
    else:
        await storage.accounts.revoke_invite(invite.invite_id)
    with pytest.raises(InviteInvalid):
        await storage.accounts.create_account(ALICE, "h", b"A" * 32, now, used)
    assert await storage.accounts.get_account(ALICE) is None


async def test_invite_checked_before_name(storage: Storage) -> None:
    """Without a valid invite nobody learns which names are taken."""
    await storage.accounts.create_account(ALICE, "h", b"A" * 32, 1)
    with pytest.raises(InviteInvalid):
        await storage.accounts.create_account(ALICE, "h", b"A" * 32, 2, token_hash(5))


# --- devices and device lists --------------------------------------------------------------------


async def test_devices_add_get_list(storage: Storage) -> None:
    assert await storage.devices.get_device(ALICE, "DEV1") is None
    await storage.devices.add_device(ALICE, "DEV2", b"K2" * 16, DeviceState.PENDING, 20)
    await storage.devices.add_device(ALICE, "DEV1", b"K1" * 16, DeviceState.ACTIVE, 10)
    await storage.devices.add_device(BOB, "DEV1", b"K3" * 16, DeviceState.ACTIVE, 5)
    dev = await storage.devices.get_device(ALICE, "DEV1")
    assert dev is not None
    assert (dev.user, dev.device_id, dev.identity_key, dev.state, dev.created_ms) \
        == (ALICE, "DEV1", b"K1" * 16, DeviceState.ACTIVE, 10)
    assert [d.device_id for d in await storage.devices.list_devices(ALICE)] == ["DEV1", "DEV2"]
    with pytest.raises(DeviceExists) as info:
        await storage.devices.add_device(ALICE, "DEV1", b"X" * 32, DeviceState.PENDING, 30)
    assert info.value.code == ErrorCode.CONFLICT


async def test_device_list_applies_states_atomically(storage: Storage) -> None:
    devices = storage.devices
    await devices.add_device(ALICE, "MASTER", b"M" * 32, DeviceState.ACTIVE, 1)
    await devices.add_device(ALICE, "LINKED", b"L" * 32, DeviceState.PENDING, 2)
    await devices.add_device(ALICE, "WAITING", b"W" * 32, DeviceState.PENDING, 3)
    revoked = await devices.put_device_list(ALICE, 1, b"body1", b"sig1",
                                            frozenset({"MASTER", "LINKED", "FUTURE"}), 10)
    assert revoked == []
    states = {d.device_id: d.state for d in await devices.list_devices(ALICE)}
    assert states == {"MASTER": DeviceState.ACTIVE, "LINKED": DeviceState.ACTIVE,
                      "WAITING": DeviceState.PENDING}
    stored = await devices.get_device_list(ALICE)
    assert stored is not None
    assert (stored.version, stored.body, stored.signature, stored.updated_ms) \
        == (1, b"body1", b"sig1", 10)

    # LINKED dropped from the list: revoked with its keys and mailbox
    await devices.set_signed_prekey(ALICE, "LINKED", 1, b"spk", 11)
    await devices.add_one_time_prekeys(ALICE, "LINKED", [(1, b"otk")], 11)
    await storage.mailboxes.deliver(BOB + "/B", "m1", b"d", [([ALICE + "/LINKED"], b"c")], 11, TTL)
    revoked = await devices.put_device_list(ALICE, 2, b"body2", b"sig2", frozenset({"MASTER"}), 12)
    assert revoked == ["LINKED"]
    assert (await devices.get_device(ALICE, "LINKED")).state == DeviceState.REVOKED  # type: ignore[union-attr]
    assert await devices.count_prekeys(ALICE, "LINKED") == (0, 0)
    assert await storage.mailboxes.pending(ALICE + "/LINKED", 0, 10) == []
    assert await storage.mailboxes.counts() == {"entries": 0, "blobs": 0}

    # a revoked device is not brought back by a later list
    await devices.put_device_list(ALICE, 3, b"body3", b"sig3", frozenset({"MASTER", "LINKED"}), 13)
    assert (await devices.get_device(ALICE, "LINKED")).state == DeviceState.REVOKED  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [4, 5])
async def test_device_list_rollback_refused(storage: Storage, version: int) -> None:
    await storage.devices.put_device_list(ALICE, 5, b"body5", b"sig5", frozenset(), 1)
    with pytest.raises(DeviceListConflict) as info:
        await storage.devices.put_device_list(ALICE, version, b"old", b"sig", frozenset(), 2)
    assert info.value.code == ErrorCode.BAD_DEVICE_LIST
    assert (await storage.devices.get_device_list(ALICE)).body == b"body5"  # type: ignore[union-attr]
    assert await storage.devices.get_device_list(BOB) is None


async def test_revoke_device(storage: Storage) -> None:
    await active_device(storage)
    await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"otk")], 1)
    await storage.mailboxes.deliver(BOB + "/B", "m1", b"d",
                                    [([ALICE + "/DEV1", ALICE + "/DEV2"], b"c")], 2, TTL)
    assert await storage.devices.revoke_device(ALICE, "DEV1", 3) is True
    assert await storage.devices.revoke_device(ALICE, "DEV1", 4) is False
    assert await storage.devices.revoke_device(ALICE, "NOPE", 4) is False
    assert await storage.devices.claim_prekeys(ALICE, "DEV1", 5) is None
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (0, 0)
    assert await storage.mailboxes.pending(ALICE + "/DEV1", 0, 10) == []
    assert len(await storage.mailboxes.pending(ALICE + "/DEV2", 0, 10)) == 1
    assert await storage.mailboxes.counts() == {"entries": 1, "blobs": 1}
    with pytest.raises(UnknownDevice) as info:
        await storage.devices.set_signed_prekey(ALICE, "DEV1", 2, b"spk", 6)
    assert info.value.code == ErrorCode.NOT_FOUND


# --- prekeys ----------------------------------------------------------------------------------


async def test_claim_hands_out_oldest_upload_first_exactly_once(storage: Storage) -> None:
    await active_device(storage)
    assert await storage.devices.add_one_time_prekeys(
        ALICE, "DEV1", [(5, b"otk5"), (3, b"otk3")], 2) == 2
    assert await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"otk1")], 3) == 3
    await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(7, False, b"pq7"), (6, False, b"pq6")], 3)
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (3, 2)
    claims = [await storage.devices.claim_prekeys(ALICE, "DEV1", 10 + i) for i in range(4)]
    assert claims == [
        ClaimedBundle(b"I" * 32, b"spk-1", b"pq7", b"otk5"),
        ClaimedBundle(b"I" * 32, b"spk-1", b"pq6", b"otk3"),
        ClaimedBundle(b"I" * 32, b"spk-1", b"pq-last", b"otk1"),
        ClaimedBundle(b"I" * 32, b"spk-1", b"pq-last", None),   # signed prekey alone
    ]
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (0, 0)


async def test_signed_and_last_resort_prekeys_are_replaced(storage: Storage) -> None:
    await active_device(storage)
    await storage.devices.set_signed_prekey(ALICE, "DEV1", 2, b"spk-2", 5)
    await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(101, True, b"pq-last-2")], 5)
    assert await storage.devices.claim_prekeys(ALICE, "DEV1", 6) \
        == ClaimedBundle(b"I" * 32, b"spk-2", b"pq-last-2", None)
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (0, 0)


async def test_claim_needs_a_live_device_with_keys(storage: Storage) -> None:
    assert await storage.devices.claim_prekeys(ALICE, "NOPE", 1) is None
    await storage.devices.add_device(ALICE, "PEND", b"P" * 32, DeviceState.PENDING, 1)
    await storage.devices.set_signed_prekey(ALICE, "PEND", 1, b"spk", 1)
    await storage.devices.add_pq_prekeys(ALICE, "PEND", [(1, True, b"pq")], 1)
    # pending devices are claimable (the handler limits that to their own user) ...
    assert await storage.devices.claim_prekeys(ALICE, "PEND", 2) is not None
    # ... revoked ones never
    await storage.devices.revoke_device(ALICE, "PEND", 3)
    assert await storage.devices.claim_prekeys(ALICE, "PEND", 4) is None
    await active_device(storage, device_id="NOSPK", signed=False)
    assert await storage.devices.claim_prekeys(ALICE, "NOSPK", 2) is None
    await active_device(storage, device_id="NOPQ", pq_last_resort=False)
    await storage.devices.add_one_time_prekeys(ALICE, "NOPQ", [(1, b"otk")], 2)
    assert await storage.devices.claim_prekeys(ALICE, "NOPQ", 3) is None
    assert await storage.devices.count_prekeys(ALICE, "NOPQ") == (1, 0)   # nothing consumed


async def test_duplicate_one_time_prekeys_refused_whole_call(storage: Storage) -> None:
    await active_device(storage)
    await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"a"), (2, b"b")], 1)
    for items in ([(3, b"c"), (2, b"b2")], [(4, b"d"), (4, b"d")]):
        with pytest.raises(DuplicatePrekey) as info:
            await storage.devices.add_one_time_prekeys(ALICE, "DEV1", items, 2)
        assert info.value.code == ErrorCode.BAD_BUNDLE
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (2, 0)
    claimed = await storage.devices.claim_prekeys(ALICE, "DEV1", 100)
    assert claimed is not None and claimed.one_time_prekey == b"a"
    # id 1 was claimed: refused within the claimed-keys TTL, accepted after expire
    with pytest.raises(DuplicatePrekey):
        await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"again")], 101)
    later = 100 + CLAIM_TTL
    assert (await storage.mailboxes.expire(later))["claimed_prekeys"] == 1
    assert await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"again")], later) == 2


async def test_one_time_prekey_reusable_after_ttl_even_before_expire(storage: Storage) -> None:
    await active_device(storage)
    await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"a")], 1)
    await storage.devices.claim_prekeys(ALICE, "DEV1", 10)
    later = 10 + CLAIM_TTL
    assert await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"b")], later) == 1
    claimed = await storage.devices.claim_prekeys(ALICE, "DEV1", later)
    assert claimed is not None and claimed.one_time_prekey == b"b"


async def test_pq_prekey_rules(storage: Storage) -> None:
    await active_device(storage)
    with pytest.raises(DuplicatePrekey):
        await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(1, True, b"x"), (2, True, b"y")], 2)
    await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(3, False, b"pq3")], 2)
    with pytest.raises(DuplicatePrekey):
        await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(4, False, b"pq4"), (3, False, b"z")], 3)
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (0, 1)
    claimed = await storage.devices.claim_prekeys(ALICE, "DEV1", 4)
    assert claimed is not None and claimed.pq_prekey == b"pq3"
    with pytest.raises(DuplicatePrekey):     # claimed within the TTL
        await storage.devices.add_pq_prekeys(ALICE, "DEV1", [(3, False, b"pq3-again")], 5)
    with pytest.raises(UnknownDevice):
        await storage.devices.add_pq_prekeys(ALICE, "NOPE", [(1, False, b"x")], 5)
    with pytest.raises(UnknownDevice):
        await storage.devices.add_one_time_prekeys(ALICE, "NOPE", [(1, b"x")], 5)


async def test_concurrent_claims_exactly_once_oldest_first(storage: Storage) -> None:
    await active_device(storage)
    uploaded = [(i, b"otk-%d" % i) for i in range(200, 100, -1)]     # upload order != id order
    await storage.devices.add_one_time_prekeys(ALICE, "DEV1", uploaded, 1)
    results: list[ClaimedBundle | None] = []

    async def claim() -> None:
        results.append(await storage.devices.claim_prekeys(ALICE, "DEV1", 2))

    async with trio.open_nursery() as nursery:
        for _ in range(60):
            nursery.start_soon(claim)
    handed_out = [r.one_time_prekey for r in results if r is not None]
    assert len(handed_out) == 60 == len(set(handed_out))
    assert set(handed_out) == {encoded for _, encoded in uploaded[:60]}
    assert await storage.devices.count_prekeys(ALICE, "DEV1") == (40, 0)


# --- mailboxes --------------------------------------------------------------------------------


async def test_deliver_pending_in_order_and_stored_once(storage: Storage) -> None:
    mb = storage.mailboxes
    d1, d2, d3 = ALICE + "/D1", ALICE + "/D2", BOB + "/D3"
    result = await mb.deliver(BOB + "/B", "m1", b"digest1",
                              [([d1], b"pairwise"), ([d2, d3], b"group"), ([], b"nobody")], 7, TTL)
    assert result.status == "new"
    assert [(e.device, e.ciphertext, e.sender, e.message_id, e.ts_ms) for e in result.entries] == [
        (d1, b"pairwise", BOB + "/B", "m1", 7), (d2, b"group", BOB + "/B", "m1", 7),
        (d3, b"group", BOB + "/B", "m1", 7)]
    seqs = [e.seq for e in result.entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert await mb.counts() == {"entries": 3, "blobs": 2}
    second = await mb.deliver(BOB + "/B", "m2", b"digest2", [([d2], b"next")], 8, TTL)
    assert await mb.pending(d2, 0, 10) == [result.entries[1], second.entries[0]]
    assert await mb.pending(d2, result.entries[1].seq, 10) == [second.entries[0]]
    assert await mb.pending(d2, 0, 1) == [result.entries[1]]
    assert await mb.pending(d2, 0, 0) == []
    assert await mb.pending(ALICE + "/NONE", 0, 10) == []


async def test_deliver_is_idempotent_and_detects_conflicts(storage: Storage) -> None:
    mb = storage.mailboxes
    first = await mb.deliver(BOB + "/B", "m1", b"digest", [([ALICE + "/D1"], b"c")], 1, TTL)
    again = await mb.deliver(BOB + "/B", "m1", b"digest", [([ALICE + "/D1"], b"c")], 2, TTL)
    other = await mb.deliver(BOB + "/B", "m1", b"other!", [([ALICE + "/D1"], b"x")], 3, TTL)
    assert (first.status, again.status, other.status) == ("new", "duplicate", "conflict")
    assert again.entries == () == other.entries
    assert await mb.counts() == {"entries": 1, "blobs": 1}
    # the same id from another sender is another message
    assert (await mb.deliver(ALICE + "/A", "m1", b"digest", [([BOB + "/D"], b"c")], 4, TTL)
            ).status == "new"
    # after the TTL the id may be used again, even before expire() ran
    assert (await mb.deliver(BOB + "/B", "m1", b"third", [([ALICE + "/D1"], b"y")], 1 + TTL, TTL)
            ).status == "new"


async def test_concurrent_duplicate_sends_store_once(storage: Storage) -> None:
    statuses: list[str] = []

    async def send() -> None:
        result = await storage.mailboxes.deliver(BOB + "/B", "m1", b"d",
                                                 [([ALICE + "/D1"], b"c")], 1, TTL)
        statuses.append(result.status)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(send)
    assert sorted(statuses) == ["duplicate"] * 19 + ["new"]
    assert await storage.mailboxes.counts() == {"entries": 1, "blobs": 1}


async def test_ack_deletes_own_entries_and_blob_with_last_pointer(storage: Storage) -> None:
    mb = storage.mailboxes
    d1, d2 = ALICE + "/D1", ALICE + "/D2"
    group = await mb.deliver(BOB + "/B", "m1", b"d", [([d1, d2], b"group")], 1, TTL)
    s1, s2 = (e.seq for e in group.entries)
    assert await mb.ack(d1, [s2]) == 0              # d2's entry: not d1's to ack
    assert await mb.ack(d1, [s1, s1, 999]) == 1
    assert await mb.counts() == {"entries": 1, "blobs": 1}
    assert await mb.pending(d2, 0, 10) == [group.entries[1]]
    assert await mb.ack(d2, [s2]) == 1
    assert await mb.counts() == {"entries": 0, "blobs": 0}
    assert await mb.ack(d2, []) == 0
    # seq never goes back, even once every entry is gone
    later = await mb.deliver(BOB + "/B", "m2", b"d", [([d1], b"next")], 2, TTL)
    assert later.entries[0].seq > s2


async def test_purge_device(storage: Storage) -> None:
    mb = storage.mailboxes
    d1, d2 = ALICE + "/D1", ALICE + "/D2"
    await mb.deliver(BOB + "/B", "m1", b"d", [([d1, d2], b"group")], 1, TTL)
    await mb.deliver(BOB + "/B", "m2", b"d", [([d1], b"pair")], 1, TTL)
    assert await mb.purge_device(d1) == 2
    assert await mb.counts() == {"entries": 1, "blobs": 1}
    assert await mb.purge_device(d1) == 0


async def test_expire(storage: Storage) -> None:
    mb = storage.mailboxes
    await active_device(storage)
    await storage.devices.add_one_time_prekeys(ALICE, "DEV1", [(1, b"a"), (2, b"b")], 1)
    await storage.devices.claim_prekeys(ALICE, "DEV1", 100)             # expires 100 + CLAIM_TTL
    await storage.accounts.create_invite(token_hash(1), 0, 500, 1, "short")
    await storage.accounts.create_invite(token_hash(2), 0, 10**9, 1, "long")
    d1, d2 = ALICE + "/D1", ALICE + "/D2"
    await mb.deliver(BOB + "/B", "old", b"d", [([d1, d2], b"group"), ([d1], b"pair")], 0, 100)
    await mb.deliver(BOB + "/B", "new", b"d", [([d1], b"fresh")], 0, 100_000)
    assert await mb.expire(99) == {"entries": 0, "blobs": 0, "message_ids": 0,
                                   "claimed_prekeys": 0, "invites": 0}
    assert await mb.expire(1_000) == {"entries": 3, "blobs": 2, "message_ids": 1,
                                      "claimed_prekeys": 0, "invites": 1}
    assert [e.message_id for e in await mb.pending(d1, 0, 10)] == ["new"]
    assert [i.note for i in await storage.accounts.list_invites()] == ["long"]
    assert (await mb.expire(100 + CLAIM_TTL))["claimed_prekeys"] == 1
    assert await mb.counts() == {"entries": 1, "blobs": 1}


async def test_register_writes_account_device_and_list_together(storage: Storage) -> None:
    from homeserver.storage.models import NewAccount
    new = NewAccount("reg@example.org", "hash", b"m" * 32, "DEVICEAAAA", b"i" * 32, 1, b"body", b"s" * 64)
    await storage.accounts.register(new, 5)
    assert (await storage.accounts.get_account("reg@example.org")) is not None
    (device,) = await storage.devices.list_devices("reg@example.org")
    assert device.state == DeviceState.ACTIVE
    assert (await storage.devices.get_device_list("reg@example.org")).version == 1
    with pytest.raises(AccountExists):
        await storage.accounts.register(NewAccount("reg@example.org", "h2", b"n" * 32, "DEVICEBBBB", b"j" * 32,
                                                   1, b"b2", b"t" * 64), 6)
    assert [d.device_id for d in await storage.devices.list_devices("reg@example.org")] == ["DEVICEAAAA"]
    with pytest.raises(InviteInvalid):
        await storage.accounts.register(NewAccount("other@example.org", "h", b"o" * 32, "DEVICECCCC", b"k" * 32,
                                                   1, b"b", b"u" * 64, invite_token_hash=b"x" * 32), 7)
    assert await storage.accounts.get_account("other@example.org") is None
    assert await storage.devices.list_devices("other@example.org") == []
    assert await storage.devices.get_device_list("other@example.org") is None
