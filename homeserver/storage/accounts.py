"""Accounts and registration invites."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from homeserver.storage.db import Database
from homeserver.storage.devices import _add_device, _put_device_list
from homeserver.storage.models import (
    Account, AccountExists, DeviceState, Invite, InviteExists, InviteInvalid, NewAccount,
)
from homeserver.storage.schema import accounts, invites


def invite_id_for(token_hash: bytes) -> str:
    """The public id of an invite: safe to show, it names the hash, not the token."""
    return token_hash.hex()[:12]


def _account(row: Any) -> Account:
    return Account(row.user, row.password_hash, bytes(row.master_key), bool(row.disabled),
                   int(row.created_ms))


def _invite(row: Any) -> Invite:
    return Invite(row.invite_id, int(row.created_ms), int(row.expires_ms), int(row.uses_left),
                  row.note, bool(row.revoked))


_account_columns = (accounts.c.user, accounts.c.password_hash, accounts.c.master_key,
                    accounts.c.disabled, accounts.c.created_ms)
_invite_columns = (invites.c.invite_id, invites.c.created_ms, invites.c.expires_ms,
                   invites.c.uses_left, invites.c.note, invites.c.revoked)


def _create_account(conn: Connection, user: str, password_hash: str, master_key: bytes,
                    now_ms: int, invite_token_hash: bytes | None) -> None:
    # The invite is checked first: without a valid invite nobody learns which names are taken.
    if invite_token_hash is not None:
        consumed = conn.execute(
            update(invites)
            .where(invites.c.token_hash == invite_token_hash, invites.c.revoked.is_(False),
                   invites.c.uses_left > 0, invites.c.expires_ms > now_ms)
            .values(uses_left=invites.c.uses_left - 1)).rowcount
        if consumed != 1:
            raise InviteInvalid("invalid or expired invite")
    if conn.execute(select(accounts.c.user).where(accounts.c.user == user)).first() is not None:
        raise AccountExists("user name is taken")
    try:
        conn.execute(insert(accounts).values(user=user, password_hash=password_hash,
                                             master_key=master_key, disabled=False,
                                             created_ms=now_ms))
    except IntegrityError:      # another process won the race (shared PostgreSQL)
        raise AccountExists("user name is taken") from None


def _create_invite(conn: Connection, token_hash: bytes, now_ms: int, expires_ms: int,
                   uses: int, note: str) -> Invite:
    invite = Invite(invite_id_for(token_hash), now_ms, expires_ms, uses, note, False)
    taken = conn.execute(select(invites.c.invite_id).where(
        (invites.c.invite_id == invite.invite_id) | (invites.c.token_hash == token_hash))).first()
    if taken is not None:
        raise InviteExists("an invite with this id exists")
    conn.execute(insert(invites).values(token_hash=token_hash, invite_id=invite.invite_id,
                                        created_ms=now_ms, expires_ms=expires_ms, uses_left=uses,
                                        note=note, revoked=False))
    return invite


class AccountRepository:
    """Accounts (user name, password hash, master key) and invites."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def register(self, new: NewAccount, now_ms: int) -> None:
        """Account, first (active) device and first device list in one write op."""

        def op(conn: Connection) -> None:
            _create_account(conn, new.user, new.password_hash, new.master_key, now_ms, new.invite_token_hash)
            _add_device(conn, new.user, new.device_id, new.identity_key, DeviceState.ACTIVE, now_ms)
            _put_device_list(conn, new.user, new.list_version, new.list_body, new.list_signature,
                             frozenset({new.device_id}), now_ms)

        await self._db.write(op)

    async def create_account(self, user: str, password_hash: str, master_key: bytes,
                             now_ms: int, invite_token_hash: bytes | None = None) -> None:
        """Create ``user``; with an invite hash, consume one use of it in the same transaction.

        Raises ``InviteInvalid`` (unknown, revoked, used up or expired invite)
        before ``AccountExists``.
        """
        await self._db.write(lambda conn: _create_account(
            conn, user, password_hash, master_key, now_ms, invite_token_hash))

    async def get_account(self, user: str) -> Account | None:
        def fn(conn: Connection) -> Account | None:
            row = conn.execute(select(*_account_columns).where(accounts.c.user == user)).first()
            return None if row is None else _account(row)
        return await self._db.read(fn)

    async def list_accounts(self) -> list[Account]:
        """Every account, by user name."""
        def fn(conn: Connection) -> list[Account]:
            return [_account(r) for r in
                    conn.execute(select(*_account_columns).order_by(accounts.c.user))]
        return await self._db.read(fn)

    async def set_disabled(self, user: str, disabled: bool) -> bool:
        """Disable or re-enable ``user``; False if there is no such account."""
        return await self._db.write(lambda conn: conn.execute(
            update(accounts).where(accounts.c.user == user).values(disabled=disabled)
        ).rowcount == 1)

    async def create_invite(self, token_hash: bytes, now_ms: int, expires_ms: int, uses: int,
                            note: str) -> Invite:
        """Store an invite by the hash of its token (the token itself is never stored)."""
        if uses < 1:
            raise ValueError("an invite needs at least one use")
        if len(token_hash) < 6:
            raise ValueError("token_hash is too short to name an invite")
        return await self._db.write(lambda conn: _create_invite(
            conn, token_hash, now_ms, expires_ms, uses, note))

    async def list_invites(self) -> list[Invite]:
        """Every invite still stored (expired ones go with ``expire``), oldest first."""
        def fn(conn: Connection) -> list[Invite]:
            return [_invite(r) for r in conn.execute(
                select(*_invite_columns).order_by(invites.c.created_ms, invites.c.invite_id))]
        return await self._db.read(fn)

    async def revoke_invite(self, invite_id: str) -> bool:
        """Revoke an invite; False if there is no such invite."""
        return await self._db.write(lambda conn: conn.execute(
            update(invites).where(invites.c.invite_id == invite_id).values(revoked=True)
        ).rowcount == 1)
