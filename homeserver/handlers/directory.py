"""Who is connected, which devices each local user has, and who watches whose device list.

Device states are a hot read path (every send checks coverage): cached in memory
per user and invalidated on every write that changes them (DESIGN §7).  Entries
also expire after ``CACHE_TTL_S`` so changes made by another process (the admin
CLI) are seen, and the cache holds at most ``CACHE_USERS`` users (LRU).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import trio

from federation.frames import Push, PushKind
from homeserver.connection import Session
from homeserver.storage.models import Device, DeviceState, DeviceStore


CACHE_TTL_S = 30.0
CACHE_USERS = 10_000


class DeviceDirectory:
    def __init__(self, devices: DeviceStore) -> None:
        self._repo = devices
        self._cache: OrderedDict[str, tuple[float, dict[str, Device]]] = OrderedDict()
        self._sessions: dict[str, Session] = {}                 # device address -> live session
        self._watchers: dict[str, set[str]] = defaultdict(set)  # user -> device addresses

    # -- device states ----------------------------------------------------------------
    async def devices_of(self, user: str) -> dict[str, Device]:
        now = trio.current_time()
        entry = self._cache.get(user)
        if entry is not None and now - entry[0] < CACHE_TTL_S:
            self._cache.move_to_end(user)
            return entry[1]
        devices = {d.device_id: d for d in await self._repo.list_devices(user)}
        self._cache[user] = (now, devices)
        self._cache.move_to_end(user)
        while len(self._cache) > CACHE_USERS:
            self._cache.popitem(last=False)
        return devices

    def invalidate(self, user: str) -> None:
        self._cache.pop(user, None)

    async def active_ids(self, user: str) -> frozenset[str]:
        return frozenset(i for i, d in (await self.devices_of(user)).items() if d.state is DeviceState.ACTIVE)

    # -- sessions ---------------------------------------------------------------------
    def attach(self, device: str, session: Session) -> Session | None:
        """Register the live session of ``device``; returns the one it replaces, if any."""
        previous = self._sessions.get(device)
        self._sessions[device] = session
        return previous if previous is not session else None

    def detach(self, device: str, session: Session) -> None:
        """Forget the session and its watches: a reconnecting client re-fetches the lists it needs."""
        if self._sessions.get(device) is session:
            del self._sessions[device]
            self.forget_device(device)

    def session_of(self, device: str) -> Session | None:
        return self._sessions.get(device)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # -- device-list watchers ---------------------------------------------------------
    def watch(self, user: str, device: str) -> None:
        self._watchers[user].add(device)

    def notify_list_changed(self, user: str, version: int) -> int:
        """Push ``device_list_changed`` to every connected local device that fetched ``user``'s list."""
        sent = 0
        push = Push(PushKind.DEVICE_LIST_CHANGED, {"user": user, "version": version})
        for device in list(self._watchers.get(user, ())):
            session = self._sessions.get(device)
            if session is not None and session.push_nowait(push):
                sent += 1
        return sent

    def forget_device(self, device: str) -> None:
        for watched in self._watchers.values():
            watched.discard(device)
