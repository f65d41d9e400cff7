"""Every handler over the memory transport, asserting what a client sees."""

import dataclasses

import pytest
import trio

from conformance.client import ProtocolDevice, authenticate, login, now_ms, register, throwaway_user
from federation.errors import ErrorCode
from federation.keys import PrekeyBundle
from federation.rpc import RemoteError

from .conftest import DOMAIN, connect, make_config, running_server


async def _user_with_devices(network, n_extra=1):
    """A registered user whose master device listed ``n_extra`` more logged-in devices."""
    user = throwaway_user(DOMAIN)
    async with connect(network) as rpc:
        master = await register(rpc, user)
        others = []
        for _ in range(n_extra):
            others.append(await login(rpc, user))
        await authenticate(rpc, master, DOMAIN)
        await rpc.request("put_device_list", device_list=master.device_list([master, *others]).to_wire())
    return [master, *others]


async def test_register_auth_and_own_devices(config):
    async with running_server(config) as (_, network):
        async with connect(network) as rpc:
            user = throwaway_user(DOMAIN)
            device = await register(rpc, user)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("devices")
            assert exc.value.code == ErrorCode.UNAUTHORIZED
            ok = await authenticate(rpc, device, DOMAIN)
            assert ok["device"] == device.address and ok["state"] == "active"
            devices = (await rpc.request("devices"))["devices"]
            assert [d["id"] for d in devices] == [device.device_id]
        async with connect(network) as rpc:
            with pytest.raises(RemoteError) as exc:
                await register(rpc, user)
            assert exc.value.code == ErrorCode.CONFLICT


async def test_registration_modes(tmp_path):
    async with running_server(make_config(tmp_path, registration="closed")) as (_, network):
        async with connect(network) as rpc:
            with pytest.raises(RemoteError) as exc:
                await register(rpc, throwaway_user(DOMAIN))
            assert exc.value.code == ErrorCode.FORBIDDEN
    async with running_server(make_config(tmp_path, registration="invite")) as (running, network):
        accounts = running.homeserver.storage.accounts
        from homeserver.handlers.accounts import invite_token_hash
        await accounts.create_invite(invite_token_hash("tok-1"), 0, 10**15, 1, "for bob")
        async with connect(network) as rpc:
            with pytest.raises(RemoteError) as exc:
                await register(rpc, throwaway_user(DOMAIN))
            assert exc.value.code == ErrorCode.UNAUTHORIZED
            with pytest.raises(RemoteError):
                await register(rpc, throwaway_user(DOMAIN), invite="wrong")
            await register(rpc, throwaway_user(DOMAIN), invite="tok-1")
            with pytest.raises(RemoteError):  # single use
                await register(rpc, throwaway_user(DOMAIN), invite="tok-1")


async def test_login_wrong_password_and_unknown_user(config):
    async with running_server(config) as (_, network):
        async with connect(network) as rpc:
            user = throwaway_user(DOMAIN)
            await register(rpc, user)
            for who, password in ((user, "wrong password"), (throwaway_user(DOMAIN), "whatever12")):
                with pytest.raises(RemoteError) as exc:
                    await login(rpc, who, password)
                assert exc.value.code == ErrorCode.UNAUTHORIZED
                assert exc.value.message == "invalid user or password"


async def test_auth_rejects_replayed_nonce_bad_and_wrong_purpose_signature(config):
    from federation import signing
    from federation.signing import Purpose
    async with running_server(config) as (_, network):
        async with connect(network) as rpc:
            device = await register(rpc, throwaway_user(DOMAIN))
            nonce = (await rpc.request("challenge"))["nonce"]
            params = device.auth_params(DOMAIN, nonce)
            wrong = dict(params, sig=signing.sign(device.identity, Purpose.S2S_REQUEST,
                                                  {k: params[k] for k in ("device", "nonce", "ts_ms")} | {"domain": DOMAIN}))
            with pytest.raises(RemoteError) as exc:
                await rpc.request("auth", **wrong)
            assert exc.value.code == ErrorCode.UNAUTHORIZED
            # the nonce was consumed by the failed attempt: a correct signature on it fails too
            with pytest.raises(RemoteError) as exc:
                await rpc.request("auth", **params)
            assert exc.value.code == ErrorCode.UNAUTHORIZED
            nonce = (await rpc.request("challenge"))["nonce"]
            await rpc.request("auth", **device.auth_params(DOMAIN, nonce))
        async with connect(network) as rpc:  # replay on another connection
            with pytest.raises(RemoteError) as exc:
                await rpc.request("auth", **device.auth_params(DOMAIN, nonce))
            assert exc.value.code == ErrorCode.UNAUTHORIZED


async def test_auth_nonce_expires_after_60_seconds(config, autojump_clock):
    base = now_ms()
    clock = lambda: base + int(trio.current_time() * 1000)  # noqa: E731
    async with running_server(config, clock=clock) as (_, network):
        async with connect(network) as rpc:
            device = await register(rpc, throwaway_user(DOMAIN))
            nonce = (await rpc.request("challenge"))["nonce"]
            await trio.sleep(61)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("auth", **device.auth_params(DOMAIN, nonce, ts_ms=clock()))
            assert exc.value.code == ErrorCode.UNAUTHORIZED


async def test_prekeys_claimed_exactly_once_oldest_first_then_last_resort(config):
    async with running_server(config) as (_, network):
        bob_devices = await _user_with_devices(network, n_extra=0)
        bob = bob_devices[0]
        async with connect(network) as rpc:
            await authenticate(rpc, bob, DOMAIN)
            counts = await rpc.request("upload_keys", **bob.prekey_upload(one_time=3, first_id=10))
            assert counts["one_time"] == 3 and counts["pq_one_time"] == 0
        alice = (await _user_with_devices(network, n_extra=0))[0]
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            seen = []
            for _ in range(4):
                answer = await rpc.request("claim", user=bob.user)
                (wire,) = answer["bundles"]
                bundle = PrekeyBundle.from_wire(wire)
                bundle.verify()
                assert bundle.device == bob.address
                seen.append(None if bundle.one_time_prekey is None else bundle.one_time_prekey.key_id)
            assert seen == [10, 11, 12, None]
            with pytest.raises(RemoteError) as exc:
                await rpc.request("claim", user=throwaway_user(DOMAIN))
            assert exc.value.code == ErrorCode.NOT_FOUND


async def test_concurrent_claims_hand_out_each_key_once(tmp_path):
    async with running_server(make_config(tmp_path), sqlite=True) as (_, network):
        bob = (await _user_with_devices(network, n_extra=0))[0]
        async with connect(network) as rpc:
            await authenticate(rpc, bob, DOMAIN)
            await rpc.request("upload_keys", **bob.prekey_upload(one_time=20, first_id=1))
        claimers = [(await _user_with_devices(network, n_extra=0))[0] for _ in range(5)]
        got: list[int | None] = []

        async def claim_some(device):
            async with connect(network) as rpc:
                await authenticate(rpc, device, DOMAIN)
                for _ in range(5):
                    (wire,) = (await rpc.request("claim", user=bob.user))["bundles"]
                    otk = wire.get("one_time_prekey")
                    got.append(None if otk is None else otk["id"])

        async with trio.open_nursery() as nursery:
            for device in claimers:
                nursery.start_soon(claim_some, device)
        ids = [g for g in got if g is not None]
        assert sorted(ids) == list(range(1, 21)) and got.count(None) == 5


async def test_upload_rejects_bad_signatures(config):
    async with running_server(config) as (_, network):
        device = (await _user_with_devices(network, n_extra=0))[0]
        async with connect(network) as rpc:
            await authenticate(rpc, device, DOMAIN)
            upload = device.prekey_upload()
            upload["signed_prekey"]["sig"] = bytes(64)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("upload_keys", **upload)
            assert exc.value.code == ErrorCode.BAD_BUNDLE
            upload = device.prekey_upload()
            upload["pq_prekeys"][0]["key"] = upload["pq_prekeys"][0]["key"][:100]
            with pytest.raises(RemoteError) as exc:
                await rpc.request("upload_keys", **upload)
            assert exc.value.code == ErrorCode.BAD_BUNDLE


async def test_device_list_verified_and_no_rollback(config):
    async with running_server(config) as (_, network):
        user = throwaway_user(DOMAIN)
        async with connect(network) as rpc:
            master = await register(rpc, user)
            phone = await login(rpc, user)
            await authenticate(rpc, master, DOMAIN)
            devices = {d["id"]: d["state"] for d in (await rpc.request("devices"))["devices"]}
            assert devices[phone.device_id] == "pending"
            v2 = master.device_list([master, phone])
            await rpc.request("put_device_list", device_list=v2.to_wire())
            devices = {d["id"]: d["state"] for d in (await rpc.request("devices"))["devices"]}
            assert devices[phone.device_id] == "active"
            old = master.device_list([master], version=1)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("put_device_list", device_list=old.to_wire())
            assert exc.value.code == ErrorCode.BAD_DEVICE_LIST
            forged = ProtocolDevice(user, master=ProtocolDevice(user).identity).device_list([master], version=9)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("put_device_list", device_list=forged.to_wire())
            assert exc.value.code == ErrorCode.BAD_DEVICE_LIST
            fetched = await rpc.request("get_device_list", user=user)
            assert fetched["version"] == 2 and fetched["device_list"]["body"] == v2.body


async def test_device_list_changed_pushed_to_watchers(config):
    async with running_server(config) as (_, network):
        bob_master = (await _user_with_devices(network, n_extra=0))[0]
        alice = (await _user_with_devices(network, n_extra=0))[0]
        async with connect(network) as alice_rpc, connect(network) as bob_rpc:
            await authenticate(alice_rpc, alice, DOMAIN)
            await alice_rpc.request("get_device_list", user=bob_master.user)
            await authenticate(bob_rpc, bob_master, DOMAIN)
            laptop = ProtocolDevice(bob_master.user)
            await bob_rpc.request("put_device_list", device_list=bob_master.device_list([bob_master, laptop]).to_wire())
            push = await alice_rpc.next_push("device_list_changed")
            assert push.fields == {"user": bob_master.user, "version": bob_master.list_version}


async def test_prekeys_low_push_key_count_and_revoke_own_device(config):
    async with running_server(config) as (_, network):
        bob_master, bob_phone = await _user_with_devices(network, n_extra=1)
        alice = (await _user_with_devices(network, n_extra=0))[0]
        async with connect(network) as phone_rpc, connect(network) as alice_rpc:
            answer = await authenticate(phone_rpc, bob_phone, DOMAIN)
            assert answer["prekeys"]["one_time"] == 0
            assert (await phone_rpc.next_push("prekeys_low")).fields["one_time"] == 0
            await phone_rpc.request("upload_keys", **bob_phone.prekey_upload(one_time=11, first_id=1))
            assert (await phone_rpc.request("key_count")) == {"one_time": 11, "pq_one_time": 0}
            await authenticate(alice_rpc, alice, DOMAIN)
            await alice_rpc.request("claim", user=bob_master.user, device_ids=[bob_phone.device_id])
            await alice_rpc.request("claim", user=bob_master.user, device_ids=[bob_phone.device_id])
            assert (await phone_rpc.next_push("prekeys_low")).fields["one_time"] == 9
        async with connect(network) as master_rpc, connect(network) as phone_rpc:
            await authenticate(master_rpc, bob_master, DOMAIN)
            await authenticate(phone_rpc, bob_phone, DOMAIN)
            assert (await master_rpc.request("revoke_device", device_id=bob_phone.device_id)) == {
                "revoked": bob_phone.device_id}
            await phone_rpc.next_push("device_revoked")
            with trio.fail_after(5):
                await phone_rpc.closed.wait()
            assert phone_rpc.close_code == 4001
            with pytest.raises(RemoteError) as exc:
                await master_rpc.request("revoke_device", device_id=bob_phone.device_id)
            assert exc.value.code == ErrorCode.NOT_FOUND


async def test_disabled_account_cannot_connect(config):
    async with running_server(config) as (running, network):
        device = (await _user_with_devices(network, n_extra=0))[0]
        await running.homeserver.storage.accounts.set_disabled(device.user, True)
        async with connect(network) as rpc:
            with pytest.raises(RemoteError) as exc:
                await authenticate(rpc, device, DOMAIN)
            assert exc.value.code == ErrorCode.FORBIDDEN
            with pytest.raises(RemoteError) as exc:
                await login(rpc, device.user)
            assert exc.value.code == ErrorCode.FORBIDDEN


async def test_healthz_and_discovery_over_http(tmp_path, nursery):
    import httpx
    from homeserver.app import serve
    from homeserver.server_keys import new_server_key
    config = make_config(tmp_path, domain="localhost")
    key = new_server_key(0, 10**15)
    running = await nursery.start(lambda task_status: serve(config, [key], task_status=task_status))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as http:
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok" and health["domain"] == "localhost"
        doc = (await http.get("/.well-known/securechat")).json()
        assert doc["domain"] == "localhost"
        assert doc["endpoints"]["c2s"] == running.c2s_url
        assert [k["key_id"] for k in doc["server_keys"]] == [key.key_id]
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/healthz")).status_code == 405
    running.stop.set()


def test_discovery_document_behind_a_proxy_names_public_endpoints(tmp_path):
    """With ``public_base`` every advertised endpoint is the public origin, HTTP included."""
    from homeserver.app import Homeserver
    from homeserver.http_api import discovery_document
    from homeserver.server_keys import new_server_key
    from homeserver.storage import MemoryStorage
    from tests.homeserver.conftest import make_config

    config = make_config(tmp_path).replace(public_base="wss://chat.example.org")
    hs = Homeserver(config, MemoryStorage(), [new_server_key(0, 10**15)])
    endpoints = discovery_document(hs)["endpoints"]
    assert endpoints == {"c2s": "wss://chat.example.org/c2s", "fed": "wss://chat.example.org/fed",
                         "http": "https://chat.example.org"}


async def test_a_server_that_does_not_federate_answers_unknown_domain_for_remote_users(tmp_path):
    config = make_config(tmp_path)
    config = config.replace(federation=dataclasses.replace(config.federation, enabled=False))
    async with running_server(config) as (_, network):
        [alice] = await _user_with_devices(network, n_extra=0)
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            remote = "bob@elsewhere.example"
            for op, params in (("claim", {"user": remote}),
                               ("send", {"message_id": "0" * 32, "ephemeral": False,
                                         "payloads": [{"devices": [f"{remote}/BBBBBBBBBB"], "ciphertext": b"x"}]})):
                with pytest.raises(RemoteError) as exc:
                    await rpc.request(op, **params)
                assert exc.value.code == ErrorCode.UNKNOWN_DOMAIN, op
                assert "federation is not enabled" in exc.value.info.message, op
