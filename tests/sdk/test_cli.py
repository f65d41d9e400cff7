"""The ``securechat`` CLI against a real homeserver process: register, send, listen, chat, login, approve.

Most commands run in-process through ``main(argv)`` (fast); the console script runs
as a subprocess where it matters: secrets piped on stdin, and ``listen`` stopped by
Ctrl-C.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clientsdk import cli
from tests.serverproc import ROOT, ServerProcess, init_server, start_server, stop

DOMAIN = "example.org"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
ALICE_PASSWORD, BOB_PASSWORD = "alice-password-1", "bob-password-22"
ALICE_PP, BOB_PP, ALICE2_PP = "alice store pp", "bob store pp", "alice phone pp"
SECURECHAT = Path(sys.executable).with_name("securechat")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(init_server(tmp_path_factory.mktemp("cli-server"), DOMAIN))
    yield running
    stop(running)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default store dir under tmp_path; no store/server from the caller's environment."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv(cli.STORE_ENV, raising=False)
    monkeypatch.delenv(cli.SERVER_ENV, raising=False)
    return tmp_path


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
             stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_script(argv: list[str], stdin: str, env_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_DATA_HOME=str(env_dir / "data"))
    env.pop(cli.STORE_ENV, None)
    return subprocess.run([str(SECURECHAT), *argv], check=False, input=stdin, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=30)


def test_secrets_are_never_options() -> None:
    """No subcommand accepts a password or passphrase on the command line."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            for flag in action.option_strings:
                assert "pass" not in flag and "secret" not in flag, (name, flag)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["register", ALICE, "--server", "ws://x/c2s", "--password", "hunter2hunter2"])
    assert info.value.code == 2


def test_group_create_send_listen_remove(server, isolated, monkeypatch, capsys) -> None:
    carol, dave = f"gcarol@{DOMAIN}", f"gdave@{DOMAIN}"
    stores = {u: isolated / f"{u}.db" for u in (carol, dave)}
    for user in (carol, dave):
        code, _, err = run_main(monkeypatch, capsys, ["register", user, "--server", server.url,
                                                      "--store", str(stores[user])], f"pw-{user}-123\npp {user}\n")
        assert code == 0, err
    code, out, err = run_main(monkeypatch, capsys, ["group", "create", "--store", str(stores[carol]), "team", dave],
                              f"pp {carol}\n")
    assert code == 0, err
    group_id = out.strip()
    assert len(group_id) == 64
    code, _, err = run_main(monkeypatch, capsys, ["group", "send", "--store", str(stores[carol]), group_id,
                                                  "hello team"], f"pp {carol}\n")
    assert code == 0, err
    code, out, _ = run_main(monkeypatch, capsys, ["listen", "--store", str(stores[dave]), "--count", "1"],
                            f"pp {dave}\n")
    assert code == 0 and out == f"[{group_id[:12]}] {carol}: hello team\n"
    code, out, _ = run_main(monkeypatch, capsys, ["group", "list", "--store", str(stores[dave])], f"pp {dave}\n")
    assert code == 0 and group_id in out and "team" in out
    code, _, err = run_main(monkeypatch, capsys, ["group", "remove", "--store", str(stores[carol]), group_id, dave],
                            f"pp {carol}\n")
    assert code == 0, err
    with pytest.raises(SystemExit) as info:                   # usage error: USER missing
        run_main(monkeypatch, capsys, ["group", "add", "--store", str(stores[carol]), group_id], f"pp {carol}\n")
    assert info.value.code == cli.EXIT_USAGE


def test_missing_secret_on_stdin_is_a_clear_error(isolated, monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, ["register", ALICE, "--server", "ws://127.0.0.1:9/c2s"], "")
    assert code == cli.EXIT_ERROR
    assert "stdin ended" in err and "Traceback" not in err
    assert not (isolated / "data" / "securechat" / f"{ALICE}.db").exists()


def test_register_send_listen_chat_login_approve(server, isolated, monkeypatch, capsys) -> None:
    # The console script reads the password and then the passphrase from stdin lines.
    done = run_script(["register", ALICE, "--server", server.url], f"{ALICE_PASSWORD}\n{ALICE_PP}\n", isolated)
    assert done.returncode == 0, done.stderr
    assert f"registered {ALICE}/" in done.stdout
    assert ALICE_PASSWORD not in done.stdout + done.stderr and ALICE_PP not in done.stdout + done.stderr
    alice_store = isolated / "data" / "securechat" / f"{ALICE}.db"
    assert alice_store.is_file()
    assert ALICE_PP.encode() not in alice_store.read_bytes()

    bob_store = isolated / "bob.db"
    code, out, _ = run_main(monkeypatch, capsys, ["register", BOB, "--server", server.url, "--store", str(bob_store)],
                            f"{BOB_PASSWORD}\n{BOB_PP}\n")
    assert code == 0 and f"registered {BOB}/" in out

    # The server URL was remembered next to the store; the account is picked with --as.
    code, _, err = run_main(monkeypatch, capsys, ["send", "--as", ALICE, BOB, "hello from the cli"], f"{ALICE_PP}\n")
    assert code == 0, err
    code, out, _ = run_main(monkeypatch, capsys, ["listen", "--store", str(bob_store), "--count", "1"], f"{BOB_PP}\n")
    assert code == 0 and out == f"{ALICE}: hello from the cli\n"

    # A wrong store passphrase is refused without a traceback.
    code, _, err = run_main(monkeypatch, capsys, ["listen", "--store", str(bob_store)], "not the passphrase\n")
    assert code == cli.EXIT_ERROR and "store_key_invalid" in err and "Traceback" not in err

    # chat: the stored history first, then each stdin line is sent; EOF ends the chat.
    monkeypatch.setenv(cli.STORE_ENV, str(bob_store))
    code, out, _ = run_main(monkeypatch, capsys, ["chat", ALICE], f"{BOB_PP}\nfirst reply\n\nsecond reply\n")
    assert code == 0 and "<- " + ALICE + "/" in out and "hello from the cli" in out
    monkeypatch.delenv(cli.STORE_ENV)
    code, out, _ = run_main(monkeypatch, capsys, ["listen", "--as", ALICE, "--count", "2"], f"{ALICE_PP}\n")
    assert code == 0 and out == f"{BOB}: first reply\n{BOB}: second reply\n"

    # login: the password typed on stdin is the one checked (a wrong one is refused).
    phone_store = isolated / "alice-phone.db"
    login = ["login", ALICE, "--server", server.url, "--store", str(phone_store)]
    code, _, err = run_main(monkeypatch, capsys, login, f"wrong-password-x\n{ALICE2_PP}\n")
    assert code == cli.EXIT_ERROR and "unauthorized" in err and not phone_store.exists()
    code, out, err = run_main(monkeypatch, capsys, login, f"{ALICE_PASSWORD}\n{ALICE2_PP}\n")
    assert code == 0, err
    linking_code = next(line for line in out.splitlines() if line.startswith("linking code: ")).split(": ")[1]

    # approve from a non-master device is refused; from the master device it signs the phone in.
    code, _, err = run_main(monkeypatch, capsys, ["approve", "--store", str(phone_store), linking_code],
                            f"{ALICE2_PP}\n")
    assert code == cli.EXIT_ERROR and "master device" in err
    code, out, err = run_main(monkeypatch, capsys, ["approve", "--as", ALICE, linking_code], f"{ALICE_PP}\n")
    assert code == 0 and "device list v2" in out, err
    code, out, _ = run_main(monkeypatch, capsys, ["devices", "--store", str(phone_store)], f"{ALICE2_PP}\n")
    assert code == 0 and "(linked device)" in out and linking_code.split(":")[1] in out

    # bob's next message reaches the new device too.
    code, _, err = run_main(monkeypatch, capsys, ["send", "--store", str(bob_store), ALICE, "to both devices"],
                            f"{BOB_PP}\n")
    assert code == 0, err
    code, out, _ = run_main(monkeypatch, capsys, ["listen", "--store", str(phone_store), "--count", "1"],
                            f"{ALICE2_PP}\n")
    assert code == 0 and out.endswith(f"{BOB}: to both devices\n")


def test_listen_runs_until_interrupted(server, isolated) -> None:
    store = isolated / "carol.db"
    done = run_script(["register", f"carol@{DOMAIN}", "--server", server.url, "--store", str(store)],
                      "carol-password-3\ncarol pp\n", isolated)
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, XDG_DATA_HOME=str(isolated / "data"))
    listener = subprocess.Popen([str(SECURECHAT), "listen", "--store", str(store)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        listener.stdin.write("carol pp\n")
        listener.stdin.flush()
        deadline = time.monotonic() + 20
        lines = []
        while time.monotonic() < deadline:
            line = listener.stderr.readline()
            lines.append(line)
            if line.startswith("* connected") or not line:
                break
        assert "* connected\n" in lines, lines
        listener.send_signal(signal.SIGINT)
        assert listener.wait(10) == cli.EXIT_INTERRUPTED
        assert "Traceback" not in listener.stderr.read()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
        listener.stdin.close()
        listener.stdout.close()
        listener.stderr.close()


def test_verify_devices_revoke_and_backup(server, isolated, monkeypatch, capsys) -> None:
    """verify (number, --confirm, --scan), devices, approve by short code, revoke, backup export/import."""
    dave, erin = f"dave@{DOMAIN}", f"erin@{DOMAIN}"
    dave_store, erin_store, phone_store = isolated / "dave.db", isolated / "erin.db", isolated / "dave-phone.db"
    for user, store, secrets_ in ((dave, dave_store, "dave-password-4\ndave pp\n"),
                                  (erin, erin_store, "erin-password-5\nerin pp\n")):
        code, _, err = run_main(monkeypatch, capsys, ["register", user, "--server", server.url, "--store", str(store)],
                                secrets_)
        assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, ["send", "--store", str(dave_store), erin, "hi erin"], "dave pp\n")
    assert code == 0, err

    # the safety number is the same on both sides; --confirm marks verified
    code, out_d, err = run_main(monkeypatch, capsys, ["verify", "--store", str(dave_store), erin], "dave pp\n")
    assert code == 0 and "trust: unverified" in out_d, err
    code, out_e, _ = run_main(monkeypatch, capsys, ["verify", "--store", str(erin_store), dave], "erin pp\n")
    number = out_d.splitlines()[2]
    assert len(number.replace(" ", "")) == 60 and number == out_e.splitlines()[2]
    code, out, _ = run_main(monkeypatch, capsys, ["verify", "--store", str(dave_store), "--confirm", erin],
                            "dave pp\n")
    assert code == 0 and f"{erin} is now verified" in out
    # --scan: erin scans the code dave shows (hex on stdin after the passphrase); garbage is a clean error
    dave_qr = next(line for line in out_d.splitlines() if line.startswith("my QR payload")).split(": ")[1]
    code, out, _ = run_main(monkeypatch, capsys, ["verify", "--store", str(erin_store), "--scan", dave],
                            f"erin pp\n{dave_qr}\n")
    assert code == 0 and "scan: match" in out
    code, out, _ = run_main(monkeypatch, capsys, ["verify", "--store", str(erin_store), dave], "erin pp\n")
    assert "trust: verified" in out
    code, _, err = run_main(monkeypatch, capsys, ["verify", "--store", str(erin_store), "--scan", dave],
                            "erin pp\nzz\n")
    assert code == cli.EXIT_ERROR and "not hex" in err and "Traceback" not in err

    # a phone logs in; the master device approves it by the short code, lists it, then revokes it
    code, out, err = run_main(monkeypatch, capsys, ["login", dave, "--server", server.url, "--store",
                                                    str(phone_store)], "dave-password-4\nphone pp\n")
    assert code == 0, err
    short = next(line for line in out.splitlines() if line.startswith("short linking code: ")).split(": ")[1]
    phone_id = short.split("-")[0]
    code, out, _ = run_main(monkeypatch, capsys, ["devices", "--store", str(dave_store)], "dave pp\n")
    assert code == 0 and f"{phone_id}  pending" in out and short in out and "(this device)" in out
    code, out, err = run_main(monkeypatch, capsys, ["approve", "--store", str(dave_store), short], "dave pp\n")
    assert code == 0 and f"approved device {phone_id}; device list v2" in out, err
    code, out, _ = run_main(monkeypatch, capsys, ["devices", "--store", str(dave_store)], "dave pp\n")
    assert f"{phone_id}  current" in out
    code, _, err = run_main(monkeypatch, capsys, ["revoke", "--store", str(phone_store), phone_id], "phone pp\n")
    assert code == cli.EXIT_ERROR and "master device" in err
    code, out, err = run_main(monkeypatch, capsys, ["revoke", "--store", str(dave_store), phone_id], "dave pp\n")
    assert code == 0 and "device list v3" in out, err
    code, out, _ = run_main(monkeypatch, capsys, ["devices", "--store", str(dave_store)], "dave pp\n")
    assert f"{phone_id}  revoked" in out

    # backup export (recovery key printed once) and import as a new master device with the trust kept
    backup = isolated / "dave.backup"
    code, out, err = run_main(monkeypatch, capsys, ["backup", "export", "--store", str(dave_store), str(backup)],
                              "dave pp\n")
    assert code == 0 and backup.is_file(), err
    recovery = next(line for line in out.splitlines() if line.startswith("recovery key")).split(": ")[1]
    restored = isolated / "dave-restored.db"
    code, _, err = run_main(monkeypatch, capsys, ["backup", "import", str(backup), "--server", server.url],
                            f"{recovery}\ndave-password-4\nnew pp\n")
    assert code == cli.EXIT_ERROR and "--as USER or --store" in err
    code, out, err = run_main(monkeypatch, capsys, ["backup", "import", str(backup), "--server", server.url,
                                                    "--store", str(restored)],
                              f"{recovery}\ndave-password-4\nnew pp\n")
    assert code == 0 and "(master device)" in out, err
    assert recovery not in err and "dave-password-4" not in out + err
    code, out, _ = run_main(monkeypatch, capsys, ["verify", "--store", str(restored), erin], "new pp\n")
    assert code == 0 and "trust: verified" in out and number in out
