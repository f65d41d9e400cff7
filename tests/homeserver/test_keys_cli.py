"""Server key rotation (``securechat-server keys``) and what a rotated server publishes for discovery."""

from __future__ import annotations

import pytest

from federation.discovery import Discovery, ServerKeyNotValid, UnknownServerKey
from federation.signing import Purpose, sign, verify
from homeserver.app import serve
from homeserver.cli import main
from homeserver.clock import wall_clock_ms
from homeserver.config import ConfigError, load_config
from homeserver.server_keys import (
    KEY_GRACE_MS,
    YEAR_MS,
    current_key,
    load_keys,
    new_server_key,
    rotate_keys,
    write_keys,
)
from homeserver.storage import MemoryStorage
from tests.homeserver.conftest import make_config

DAY_MS = 86_400_000


def test_rotate_keeps_old_keys_and_drops_long_expired():
    now = 100 * DAY_MS
    long_expired = new_server_key(now - 30 * DAY_MS, 10 * DAY_MS)      # ended 20 days ago
    recently_expired = new_server_key(now - 11 * DAY_MS, 10 * DAY_MS)  # ended 1 day ago: within grace
    old = new_server_key(now - 50 * DAY_MS)
    future = new_server_key(now + DAY_MS)
    keys = rotate_keys([long_expired, recently_expired, old, future], now)
    assert keys[:-1] == [recently_expired, old, future]                 # windows unchanged
    new = keys[-1]
    assert (new.valid_from_ms, new.valid_until_ms) == (now, now + YEAR_MS)
    assert new.key_id not in {k.key_id for k in keys[:-1]}
    assert current_key(keys, now) == new                                 # the newest valid key signs
    assert current_key(keys, now + DAY_MS) == future
    assert rotate_keys([recently_expired], now, overlap_ms=0)[:-1] == []
    end = recently_expired.valid_until_ms
    assert rotate_keys([recently_expired], end + KEY_GRACE_MS - 1)[:-1] == [recently_expired]
    assert rotate_keys([recently_expired], end + KEY_GRACE_MS)[:-1] == []
    with pytest.raises(ConfigError):
        rotate_keys([old], now, lifetime_ms=0)


def test_keys_rotate_and_list_cli(tmp_path, capsys):
    assert main(["init", str(tmp_path), "--domain", "example.org"]) == 0
    config = str(tmp_path / "homeserver.toml")
    key_file = load_config(config).signing_key_file
    (first,) = load_keys(key_file)
    capsys.readouterr()

    assert main(["keys", "list", "--config", config]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(first.key_id) and line.endswith("signing")

    assert main(["keys", "rotate", "--config", config, "--days", "30"]) == 0
    out = capsys.readouterr().out
    keys = load_keys(key_file)
    assert len(keys) == 2 and keys[0].key_id == first.key_id
    assert keys[0].valid_until_ms == first.valid_until_ms               # old window unchanged
    assert keys[0].public_key == first.public_key
    assert f"new signing key {keys[1].key_id}" in out
    assert keys[1].valid_until_ms - keys[1].valid_from_ms == 30 * DAY_MS
    assert key_file.stat().st_mode & 0o077 == 0
    assert not key_file.with_suffix(".tmp").exists()                    # written atomically

    assert main(["keys", "list", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(first.key_id) and lines[0].endswith("published")
    assert lines[1].startswith(keys[1].key_id) and lines[1].endswith("signing")

    assert main(["keys", "rotate", "--config", config, "--days", "0"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["keys", "list", "--config", str(tmp_path / "missing.toml")]) == 1


def test_keys_list_flags_a_server_without_a_valid_key(tmp_path, capsys):
    main(["init", str(tmp_path), "--domain", "example.org"])
    config = str(tmp_path / "homeserver.toml")
    key_file = load_config(config).signing_key_file
    write_keys(key_file, [new_server_key(wall_clock_ms() - 2 * DAY_MS, DAY_MS)])
    capsys.readouterr()
    assert main(["keys", "list", "--config", config]) == 1
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("expired") and "keys rotate" in captured.err


async def test_rotated_server_publishes_every_unexpired_key_and_discovery_reads_it(tmp_path, nursery):
    """A real in-process homeserver on 127.0.0.1, read by ``Discovery`` over plain HTTP (loopback)."""
    now = wall_clock_ms()
    expired = new_server_key(now - 3 * DAY_MS, DAY_MS)
    old = new_server_key(now - 10 * DAY_MS)
    keys = rotate_keys([expired, old], now - 1000)
    new = keys[-1]
    assert keys == [expired, old, new]
    config = make_config(tmp_path)
    running = await nursery.start(lambda task_status: serve(config, keys, storage=MemoryStorage(),
                                                            task_status=task_status))
    base_url = f"http://127.0.0.1:{running.http_port}"
    async with Discovery(static={"example.org": base_url}) as discovery:
        document = await discovery.lookup("example.org")
        assert document.domain == "example.org" and document.endpoints.c2s == running.c2s_url
        assert document.endpoints.http == base_url
        assert {k.key_id for k in document.server_keys} == {old.key_id, new.key_id}
        # what the server signs now verifies; what it signed before the rotation still does
        txn = {"origin": "example.org", "destination": "example.net", "ts_ms": now, "txn_id": "t1",
               "envelopes": []}
        signer = current_key(keys, now)
        assert signer == new
        pub = await discovery.verify_key("example.org", signer.key_id, now, now)
        verify(pub, Purpose.S2S_TXN, txn, sign(signer.private_key, Purpose.S2S_TXN, txn))
        assert await discovery.verify_key("example.org", old.key_id, now - DAY_MS, now) == old.public_key
        with pytest.raises(ServerKeyNotValid):        # the new key did not exist before the rotation
            await discovery.verify_key("example.org", new.key_id, now - DAY_MS, now)
        with pytest.raises(UnknownServerKey):         # expired keys are not published
            await discovery.verify_key("example.org", expired.key_id, now - 3 * DAY_MS + 1, now)
        assert discovery.fetches == 1
    running.stop.set()
