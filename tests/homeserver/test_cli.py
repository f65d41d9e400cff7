"""securechat-server init and the admin commands, as an operator runs them."""

import trio

from homeserver.cli import main
from homeserver.config import load_config
from homeserver.handlers.accounts import invite_token_hash
from homeserver.server_keys import load_keys
from homeserver.storage import DeviceState, open_storage


def _storage_call(config_path, work):
    config = load_config(config_path)

    async def run():
        async with trio.open_nursery() as nursery:
            storage = await open_storage(config.storage_url, nursery)
            try:
                return await work(storage)
            finally:
                await storage.aclose()
                nursery.cancel_scope.cancel()

    return trio.run(run)


def test_init_writes_config_and_secret_key(tmp_path, capsys):
    assert main(["init", str(tmp_path / "hs"), "--domain", "example.org", "--port", "9000",
                 "--http-port", "9001"]) == 0
    config = load_config(tmp_path / "hs" / "homeserver.toml")
    assert (config.domain, config.websocket_port, config.http_port) == ("example.org", 9000, 9001)
    key_file = tmp_path / "hs" / "server_signing_key.toml"
    assert key_file.stat().st_mode & 0o077 == 0
    (key,) = load_keys(key_file)
    assert key.key_id.startswith("ed25519:") and key.valid_until_ms > key.valid_from_ms
    assert main(["init", str(tmp_path / "hs"), "--domain", "example.org"]) == 1  # no silent overwrite
    assert main(["init", str(tmp_path / "bad"), "--domain", "Not A Domain"]) == 1
    assert "error" in capsys.readouterr().err


def test_invite_user_and_device_admin(tmp_path, capsys):
    main(["init", str(tmp_path), "--domain", "example.org", "--registration", "invite"])
    config = str(tmp_path / "homeserver.toml")
    capsys.readouterr()
    assert main(["invite", "create", "--config", config, "--uses", "2", "--note", "for bob"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    invite_id, token = line.removeprefix("invite ").split(": ")
    assert len(invite_id) == 12

    async def create(storage):
        await storage.accounts.create_account("bob@example.org", "hash", b"k" * 32, 1, invite_token_hash(token))
        await storage.devices.add_device("bob@example.org", "AAAAAAAAAA", b"i" * 32, DeviceState.ACTIVE, 1)

    _storage_call(config, create)
    assert main(["invite", "list", "--config", config]) == 0
    assert "1 use(s) left" in capsys.readouterr().out
    assert main(["invite", "revoke", invite_id, "--config", config]) == 0
    assert main(["invite", "revoke", "000000000000", "--config", config]) == 1
    assert main(["user", "list", "--config", config]) == 0
    assert "bob@example.org" in capsys.readouterr().out
    assert main(["user", "disable", "bob@example.org", "--config", config]) == 0
    assert main(["user", "list", "--config", config]) == 0
    assert "(disabled)" in capsys.readouterr().out
    assert main(["device", "list", "bob@example.org", "--config", config]) == 0
    assert "AAAAAAAAAA  active" in capsys.readouterr().out
    assert main(["device", "revoke", "bob@example.org", "AAAAAAAAAA", "--config", config]) == 0
    assert main(["device", "list", "bob@example.org", "--config", config]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["device", "revoke", "bob@example.org", "AAAAAAAAAA", "--config", config]) == 1
