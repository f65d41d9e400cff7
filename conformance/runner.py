"""Black-box checks of the client-server protocol against any homeserver (conformance/PROTOCOL.md).

Uses only the wire: WebSocket ``/c2s``, canonical msgpack frames, throwaway accounts
with random names.  Each check prints ``PASS name`` or ``FAIL name: reason``; a
failed check never stops the others.  Users are registered lazily and shared
between checks, so a server with default rate limits (10 registrations/logins
per address in a burst) can be checked too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import trio

from conformance.client import ProtocolDevice, authenticate, login, register, throwaway_user
from federation import codec, signing
from federation.errors import ErrorCode
from federation.keys import PrekeyBundle
from federation.rpc import RemoteError, RpcClient, open_rpc
from federation.signing import Purpose
from federation.transport import (
    CLOSE_NORMAL, CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, DEFAULT_MAX_FRAME, Transport, TransportClosed,
    connect_websocket,
)

QUIET_S = 0.5                  # how long "nothing arrives" is watched for


class CheckFailed(Exception):
    """A check saw something the protocol does not allow; the message says what."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""

    def line(self) -> str:
        return f"PASS {self.name}" if self.passed else f"FAIL {self.name}: {self.reason}"


def check(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


async def expect_error(code: ErrorCode, call: Awaitable[Any]) -> RemoteError:
    """Await a request that must fail with ``code``."""
    try:
        answer = await call
    except RemoteError as exc:
        check(exc.code == code, f"expected error {code.value}, got {exc.info.code} ({exc.message})")
        return exc
    raise CheckFailed(f"expected error {code.value}, got ok {sorted(answer) if isinstance(answer, dict) else answer}")


async def expect_quiet(rpc: RpcClient, kind: str, what: str) -> None:
    with trio.move_on_after(QUIET_S):
        push = await rpc.next_push(kind)
        raise CheckFailed(f"{what}: got {kind} {push.fields.get('message_id', '')!r}")


def failure_reason(exc: BaseException, timeout_s: float) -> str:
    """One line for a failed check; exceptions leaving a nursery arrive wrapped in groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, CheckFailed):
        return str(exc)
    if isinstance(exc, RemoteError):
        return f"unexpected error {exc.info.code} ({exc.message})"
    if isinstance(exc, TransportClosed):
        return f"connection closed unexpectedly (code {exc.code}{': ' + exc.reason if exc.reason else ''})"
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}"


def payloads(devices: list[ProtocolDevice], text: bytes) -> list[dict[str, Any]]:
    return [{"devices": [d.address], "ciphertext": text + b"/" + d.device_id.encode()} for d in devices]


class Runner:
    """Runs every check against ``url``; ``domain`` defaults to what ``challenge`` reports."""

    def __init__(self, url: str, domain: str | None = None, *, timeout_s: float = 15.0,
                 max_frame: int = DEFAULT_MAX_FRAME, out: Callable[[str], None] = print) -> None:
        self.url = url
        self.domain = domain
        self.timeout_s = timeout_s
        self.max_frame = max_frame
        self.out = out
        self._users: dict[str, list[ProtocolDevice]] = {}
        self._user_errors: dict[str, str] = {}

    # -- connections ------------------------------------------------------------------
    @asynccontextmanager
    async def raw(self) -> AsyncIterator[Transport]:
        transport = await connect_websocket(self.url, max_frame=self.max_frame)
        try:
            yield transport
        finally:
            with trio.CancelScope(shield=True):
                await transport.aclose()

    @asynccontextmanager
    async def connect(self, device: ProtocolDevice | None = None) -> AsyncIterator[RpcClient]:
        """A connection, authenticated as ``device`` if given."""
        async with self.raw() as transport, open_rpc(transport) as rpc:
            if device is not None:
                await authenticate(rpc, device, self.domain or "")
            yield rpc

    # -- shared throwaway users -------------------------------------------------------
    async def user(self, role: str, linked: int = 0) -> list[ProtocolDevice]:
        """A registered user (master device first) with ``linked`` more devices signed into its list."""
        if role in self._user_errors:
            raise CheckFailed(self._user_errors[role])
        if role not in self._users:
            try:
                self._users[role] = await self._create_user(role, linked)
            except Exception as exc:
                self._user_errors[role] = failure_reason(exc, self.timeout_s)
                raise CheckFailed(self._user_errors[role]) from None
        return self._users[role]

    async def _create_user(self, role: str, linked: int) -> list[ProtocolDevice]:
        user = throwaway_user(self.domain or "", prefix=f"conf-{role}-")
        async with self.connect() as rpc:
            try:
                master = await register(rpc, user)
            except RemoteError as exc:
                raise CheckFailed(f"registration refused: {exc.info.code} ({exc.message})") from None
            others = [await login(rpc, user) for _ in range(linked)]
            if others:
                await authenticate(rpc, master, self.domain or "")
                await rpc.request("put_device_list", device_list=master.device_list([master, *others]).to_wire())
        return [master, *others]

    # -- running ----------------------------------------------------------------------
    def checks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [(name.removeprefix("check_"), getattr(self, name)) for name in CHECK_ORDER]

    async def run(self) -> list[CheckResult]:
        results = []
        if self.domain is None:
            first = await self._run_one("connect", self._discover_domain)
            if not first.passed:
                self.out(first.line())
                self.out("0 passed, 1 failed")
                return [first]
        for name, fn in self.checks():
            result = await self._run_one(name, fn)
            self.out(result.line())
            results.append(result)
        passed = sum(r.passed for r in results)
        self.out(f"{passed} passed, {len(results) - passed} failed")
        return results

    async def _run_one(self, name: str, fn: Callable[[], Awaitable[None]]) -> CheckResult:
        try:
            with trio.fail_after(self.timeout_s):
                await fn()
        except Exception as exc:  # a broken server must not crash the runner
            return CheckResult(name, False, failure_reason(exc, self.timeout_s))
        return CheckResult(name, True)

    async def _discover_domain(self) -> None:
        async with self.connect() as rpc:
            domain = (await rpc.request("challenge")).get("domain")
        check(isinstance(domain, str) and bool(domain), "the challenge op reports no domain")
        self.domain = domain

    # -- checks -------------------------------------------------------------------------
    async def check_ping(self) -> None:
        async with self.connect() as rpc:
            answer = await rpc.request("ping")
            check(isinstance(answer.get("ts_ms"), int), f"ping answer has no integer ts_ms: {answer}")

    async def check_challenge(self) -> None:
        async with self.connect() as rpc:
            answer = await rpc.request("challenge")
        nonce, domain = answer.get("nonce"), answer.get("domain")
        check(isinstance(nonce, bytes) and len(nonce) == 32, "challenge nonce is not 32 bytes")
        check(isinstance(domain, str) and bool(domain), "challenge has no domain")
        check(isinstance(answer.get("now_ms"), int), "challenge has no integer now_ms")

    async def check_register_and_auth(self) -> None:
        master = (await self.user("alice"))[0]
        async with self.connect() as rpc:
            answer = await authenticate(rpc, master, self.domain or "")
            check(answer.get("device") == master.address, f"auth answered device {answer.get('device')!r}")
            check(answer.get("state") == "active", f"registered device is {answer.get('state')!r}, not active")
            devices = (await rpc.request("devices"))["devices"]
            check([d["id"] for d in devices] == [master.device_id], "devices does not list exactly this device")
            await expect_error(ErrorCode.CONFLICT, register(rpc, master.user))

    async def check_unauthenticated_op_refused(self) -> None:
        async with self.connect() as rpc:
            for op, params in (("devices", {}), ("send", {"message_id": "x", "payloads": []}), ("ack", {"seqs": []})):
                await expect_error(ErrorCode.UNAUTHORIZED, rpc.request(op, **params))

    async def check_unknown_op(self) -> None:
        async with self.connect() as rpc:
            await expect_error(ErrorCode.UNKNOWN_OP, rpc.request("no_such_op"))
            await rpc.request("ping")

    async def check_wrong_field_type(self) -> None:
        async with self.connect() as rpc:
            await expect_error(ErrorCode.BAD_REQUEST, rpc.request("auth", device=123, nonce="x", ts_ms="now", sig=1))
            await expect_error(ErrorCode.BAD_REQUEST, rpc.request("auth", device="a@b/ABCDEFGHIJ", nonce=bytes(32),
                                                                  ts_ms=True, sig=bytes(64)))
        async with self.connect((await self.user("alice"))[0]) as rpc:
            await expect_error(ErrorCode.BAD_REQUEST, rpc.request("claim", user=["not", "a", "string"]))
            await expect_error(ErrorCode.BAD_REQUEST, rpc.request("ack", seqs="1"))

    async def check_non_canonical_msgpack(self) -> None:
        frames = {
            "unsorted keys": b"\x82\xa2op\xa4ping\xa2id\x01",
            "non-shortest id": b"\x82\xa2id\xcc\x01\xa2op\xa4ping",
            "trailing byte": b"\x82\xa2id\x01\xa2op\xa4ping\xc0",
            "float id": b"\x82\xa2id\xcb" + bytes(8) + b"\xa2op\xa4ping",
        }
        for what, frame in frames.items():
            async with self.raw() as transport:
                await transport.send(frame)
                try:
                    with trio.fail_after(5):
                        reply = codec.decode(await transport.receive())
                except TransportClosed as exc:
                    check(exc.code in (CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_POLICY),
                          f"{what}: closed with code {exc.code}, expected 1002/1008/1000")
                else:
                    error = reply.get("error") if isinstance(reply, dict) else None
                    check(isinstance(error, dict) and error.get("code") == ErrorCode.BAD_REQUEST,
                          f"{what}: answered {reply!r}, expected a bad_request error frame or a close")
        async with self.connect() as rpc:
            await rpc.request("ping")

    async def check_oversized_frame_closes_1009(self) -> None:
        big = codec.Limits(max_bytes=self.max_frame * 2)
        frame = codec.encode({"id": 1, "op": "ping", "pad": bytes(self.max_frame)}, big)
        async with self.raw() as transport:
            try:
                await transport.send(frame)
                with trio.fail_after(5):
                    reply = await transport.receive()
            except TransportClosed as exc:
                check(exc.code == CLOSE_TOO_BIG, f"closed with code {exc.code}, expected {CLOSE_TOO_BIG}")
            else:
                raise CheckFailed(f"a {len(frame)}-byte frame was answered ({len(reply)} bytes), not closed")
        async with self.connect() as rpc:
            await rpc.request("ping")

    async def check_replayed_auth_nonce_refused(self) -> None:
        master = (await self.user("alice"))[0]
        async with self.connect() as rpc:
            challenge = await rpc.request("challenge")
            params = master.auth_params(self.domain or "", challenge["nonce"], challenge["now_ms"])
            await rpc.request("auth", **params)
        async with self.connect() as rpc:
            await expect_error(ErrorCode.UNAUTHORIZED, rpc.request("auth", **params))

    async def check_wrong_purpose_auth_refused(self) -> None:
        master = (await self.user("alice"))[0]
        async with self.connect() as rpc:
            for purpose in (Purpose.S2S_REQUEST, Purpose.DEVICE_LIST):
                challenge = await rpc.request("challenge")
                fields = {"device": master.address, "nonce": challenge["nonce"], "ts_ms": challenge["now_ms"]}
                wrong = signing.sign(master.identity, purpose, {**fields, "domain": self.domain})
                await expect_error(ErrorCode.UNAUTHORIZED, rpc.request("auth", **fields, sig=wrong))
            await authenticate(rpc, master, self.domain or "")  # the same device with the right purpose

    async def check_prekeys_claimed_once_oldest_first_then_last_resort(self) -> None:
        bob = (await self.user("carol"))[0]
        async with self.connect(bob) as rpc:
            counts = await rpc.request("upload_keys", **bob.prekey_upload(one_time=3, first_id=10))
            check(counts.get("one_time") == 3, f"after uploading 3 one-time prekeys the count is {counts}")
        alice = (await self.user("alice"))[0]
        seen: list[int | None] = []
        async with self.connect(alice) as rpc:
            for _ in range(4):
                answer = await rpc.request("claim", user=bob.user)
                check(answer.get("missing") == [], f"claim reported missing devices {answer.get('missing')}")
                bundles = answer.get("bundles")
                check(isinstance(bundles, list) and len(bundles) == 1, "claim did not return exactly one bundle")
                bundle = PrekeyBundle.from_wire(cast(list[Any], bundles)[0])   # checked just above
                bundle.verify()
                check(bundle.device == bob.address, f"bundle is for {bundle.device}")
                seen.append(None if bundle.one_time_prekey is None else bundle.one_time_prekey.key_id)
        check(seen == [10, 11, 12, None], f"one-time prekey ids claimed in order {seen}, expected [10, 11, 12, None]")

    async def check_claim_unknown_user_not_found(self) -> None:
        async with self.connect((await self.user("alice"))[0]) as rpc:
            await expect_error(ErrorCode.NOT_FOUND, rpc.request("claim", user=throwaway_user(self.domain or "")))

    async def check_device_list_rollback_refused(self) -> None:
        master = (await self.user("dave"))[0]
        async with self.connect(master) as rpc:
            newer = master.device_list([master])
            answer = await rpc.request("put_device_list", device_list=newer.to_wire())
            version = master.list_version
            check(answer.get("version") == version, f"put_device_list answered {answer}")
            older = master.device_list([master], version=version - 1)
            master.list_version = version
            await expect_error(ErrorCode.BAD_DEVICE_LIST, rpc.request("put_device_list", device_list=older.to_wire()))
            forger = ProtocolDevice(master.user, master=ProtocolDevice(master.user).identity)
            forged = forger.device_list([master], version=version + 5)
            await expect_error(ErrorCode.BAD_DEVICE_LIST, rpc.request("put_device_list", device_list=forged.to_wire()))
            fetched = await rpc.request("get_device_list", user=master.user)
            check(fetched.get("device_list", {}).get("body") == newer.body, "get_device_list does not return "
                                                                              "the newest accepted list")

    async def check_login_creates_pending_device(self) -> None:
        master = (await self.user("dave"))[0]
        async with self.connect() as rpc:
            phone = await login(rpc, master.user)
            answer = await authenticate(rpc, phone, self.domain or "")
            check(answer.get("state") == "pending", f"a device created by login is {answer.get('state')!r}")
            alice = (await self.user("alice"))[0]
            await expect_error(ErrorCode.FORBIDDEN, rpc.request("send", message_id="p1",
                                                                payloads=payloads([alice, master], b"x")))
        async with self.connect(master) as rpc:
            states = {d["id"]: d["state"] for d in (await rpc.request("devices"))["devices"]}
            check(states.get(phone.device_id) == "pending", f"devices shows the new device as {states}")
            await rpc.request("put_device_list", device_list=master.device_list([master, phone]).to_wire())
            states = {d["id"]: d["state"] for d in (await rpc.request("devices"))["devices"]}
            check(states.get(phone.device_id) == "active", "a device named in the list did not become active")

    async def check_send_stale_devices(self) -> None:
        alice = (await self.user("alice"))[0]
        bob = await self.user("bob", linked=1)
        ghost = ProtocolDevice(bob[0].user)
        async with self.connect(alice) as rpc:
            exc = await expect_error(ErrorCode.STALE_DEVICES, rpc.request(
                "send", message_id="stale-1", payloads=payloads([bob[0]], b"s")))
            expected = {bob[0].user: {"missing": [bob[1].device_id], "extra": [], "revoked": []}}
            check(exc.details == expected, f"stale_devices details {exc.details}, expected {expected}")
            exc = await expect_error(ErrorCode.STALE_DEVICES, rpc.request(
                "send", message_id="stale-1", payloads=payloads([*bob, ghost], b"s")))
            expected = {bob[0].user: {"missing": [], "extra": [ghost.device_id], "revoked": []}}
            check(exc.details == expected, f"stale_devices details {exc.details}, expected {expected}")

    async def check_send_live_push_and_ack(self) -> None:
        alice = (await self.user("alice"))[0]
        bob = await self.user("bob", linked=1)
        async with self.connect(bob[1]) as receiver, self.connect(alice) as sender:
            ok = await sender.request("send", message_id="live-1", payloads=payloads(bob, b"live"))
            check(ok.get("message_id") == "live-1" and ok.get("duplicate") is False, f"send answered {ok}")
            push = await receiver.next_push("envelope")
            f = push.fields
            check(f.get("sender") == alice.address and f.get("message_id") == "live-1"
                  and f.get("ciphertext") == b"live/" + bob[1].device_id.encode(),
                  f"envelope push has wrong fields: sender {f.get('sender')!r}, message_id {f.get('message_id')!r}")
            check(isinstance(f.get("seq"), int) and f["seq"] > 0 and isinstance(f.get("ts_ms"), int),
                  "envelope push lacks a positive seq or ts_ms")
            answer = await receiver.request("ack", seqs=[f["seq"]])
            check(answer.get("removed") == 1, f"ack answered {answer}")
        async with self.connect(bob[0]) as rpc:  # the other device's copy: drain it for later checks
            push = await rpc.next_push("envelope")
            await rpc.request("ack", seqs=[push.fields["seq"]])
        async with self.connect(bob[1]) as rpc:
            await expect_quiet(rpc, "envelope", "an acknowledged envelope was delivered again")

    async def check_redelivery_after_reconnect_in_order(self) -> None:
        alice = (await self.user("alice"))[0]
        carol = (await self.user("carol"))[0]
        ids = [f"order-{i}" for i in range(6)]
        async with self.connect(alice) as rpc:
            for i, message_id in enumerate(ids):
                await rpc.request("send", message_id=message_id, payloads=payloads([carol], b"%d" % i))
        async with self.connect(carol) as rpc:
            got = [(await rpc.next_push("envelope")).fields for _ in ids]
            check([g["message_id"] for g in got] == ids, f"backlog order {[g['message_id'] for g in got]}")
            await rpc.request("ack", seqs=[g["seq"] for g in got[:2]])
        async with self.connect(carol) as rpc:
            again = [(await rpc.next_push("envelope")).fields for _ in ids[2:]]
            check([g["message_id"] for g in again] == ids[2:], "unacknowledged envelopes not redelivered in order: "
                  f"{[g['message_id'] for g in again]}")
            check([g["seq"] for g in again] == [g["seq"] for g in got[2:]], "redelivered envelopes changed seq")
            await rpc.request("ack", seqs=[g["seq"] for g in again])
            await expect_quiet(rpc, "envelope", "more envelopes than were sent")

    async def check_idempotent_message_id_and_conflict(self) -> None:
        alice = (await self.user("alice"))[0]
        carol = (await self.user("carol"))[0]
        async with self.connect(alice) as rpc:
            first = await rpc.request("send", message_id="idem-1", payloads=payloads([carol], b"same"))
            again = await rpc.request("send", message_id="idem-1", payloads=payloads([carol], b"same"))
            check(first.get("duplicate") is False and again.get("duplicate") is True,
                  f"retry with the same bytes answered {again}, expected duplicate: true")
            await expect_error(ErrorCode.CONFLICT, rpc.request("send", message_id="idem-1",
                                                               payloads=payloads([carol], b"other")))
        async with self.connect(carol) as rpc:
            push = await rpc.next_push("envelope")
            check(push.fields.get("message_id") == "idem-1", "the message was not delivered")
            await rpc.request("ack", seqs=[push.fields["seq"]])
            await expect_quiet(rpc, "envelope", "a retried message_id was delivered twice")

    async def check_ephemeral_not_stored(self) -> None:
        alice = (await self.user("alice"))[0]
        bob = await self.user("bob", linked=1)
        async with self.connect(bob[0]) as receiver, self.connect(alice) as sender:
            ok = await sender.request("send", message_id="eph-1", ephemeral=True, payloads=payloads(bob, b"typing"))
            check(ok.get("delivered") == 1, f"ephemeral send to one connected device answered {ok}")
            push = await receiver.next_push("envelope")
            check(push.fields.get("ephemeral") is True and push.fields.get("message_id") == "eph-1",
                  "ephemeral push not marked ephemeral")
        async with self.connect(bob[1]) as rpc:
            await expect_quiet(rpc, "envelope", "an ephemeral message was stored for an offline device")

    async def check_device_list_changed_push(self) -> None:
        alice = (await self.user("alice"))[0]
        bob = await self.user("bob", linked=1)
        async with self.connect(alice) as watcher, self.connect(bob[0]) as owner:
            listed = await watcher.request("get_device_list", user=bob[0].user)
            check(listed.get("version") == bob[0].list_version, f"get_device_list version {listed.get('version')}")
            await owner.request("put_device_list", device_list=bob[0].device_list(bob).to_wire())
            push = await watcher.next_push("device_list_changed")
            expected = {"user": bob[0].user, "version": bob[0].list_version}
            check(push.fields == expected, f"device_list_changed push {push.fields}, expected {expected}")


CHECK_ORDER = [
    "check_ping", "check_challenge", "check_register_and_auth", "check_unauthenticated_op_refused",
    "check_unknown_op", "check_wrong_field_type", "check_non_canonical_msgpack", "check_oversized_frame_closes_1009",
    "check_replayed_auth_nonce_refused", "check_wrong_purpose_auth_refused",
    "check_prekeys_claimed_once_oldest_first_then_last_resort", "check_claim_unknown_user_not_found",
    "check_device_list_rollback_refused", "check_login_creates_pending_device", "check_send_stale_devices",
    "check_send_live_push_and_ack", "check_redelivery_after_reconnect_in_order",
    "check_idempotent_message_id_and_conflict", "check_ephemeral_not_stored", "check_device_list_changed_push",
]


async def run_checks(url: str, domain: str | None = None, *, out: Callable[[str], None] = print,
                     timeout_s: float = 15.0, max_frame: int = DEFAULT_MAX_FRAME) -> list[CheckResult]:
    """Run every check against ``url``; returns the results (lines go to ``out``)."""
    return await Runner(url, domain, out=out, timeout_s=timeout_s, max_frame=max_frame).run()


def exit_code(results: list[CheckResult]) -> int:
    return 0 if results and all(r.passed for r in results) else 1


__all__ = ["CheckFailed", "CheckResult", "Runner", "exit_code", "run_checks"]
