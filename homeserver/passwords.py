"""Argon2id password hashes (pynacl), computed off the event loop and bounded in concurrency.

Each hash takes ~64 MiB and ~0.1 s at the default cost: a limiter keeps a burst of
logins from exhausting memory, and the hash runs in a worker thread.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.pwhash
import trio

_LIMITER = trio.CapacityLimiter(2)
MAX_PASSWORD_BYTES = 1024


class PasswordHasher:
    def __init__(self, opslimit: int, memlimit: int) -> None:
        self.opslimit = opslimit
        self.memlimit = memlimit

    async def hash(self, password: str) -> str:
        data = password.encode("utf-8")
        digest = await trio.to_thread.run_sync(
            lambda: nacl.pwhash.argon2id.str(data, opslimit=self.opslimit, memlimit=self.memlimit),
            limiter=_LIMITER)
        return digest.decode("ascii")

    async def verify(self, password_hash: str, password: str) -> bool:
        data = password.encode("utf-8")

        def check() -> bool:
            try:
                return bool(nacl.pwhash.verify(password_hash.encode("ascii"), data))
            except nacl.exceptions.InvalidkeyError:
                return False

        return await trio.to_thread.run_sync(check, limiter=_LIMITER)
