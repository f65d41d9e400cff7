"""One client per store: a second opener, in this process or another, gets ``StoreInUse`` at once.

Two clients on one store would advance two copies of the same ratchets and encrypt
different messages under the same message keys; a crashed holder must not leave the
store locked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clientsdk.errors import StoreInUse
from clientsdk.store import Batch, Store
from tests.sdk.conftest import World

KEY = b"k" * 32
REPO = Path(__file__).resolve().parents[2]

# Opens the store in a child process and reports what happened; with "hold", keeps it open.
_CHILD = textwrap.dedent("""
    import sys, time
    from clientsdk.errors import StoreInUse
    from clientsdk.store import Store
    try:
        store = Store.open(sys.argv[1], store_key=b"k" * 32)
    except StoreInUse as exc:
        print("in_use", exc.code, flush=True)
        sys.exit(3)
    print("opened", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(60)
    store.close()
""")


def _child(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_second_open_in_this_process_is_refused_at_once_and_allowed_after_close(tmp_path):
    path = tmp_path / "s.db"
    first = Store.create(path, store_key=KEY)
    started = time.monotonic()
    with pytest.raises(StoreInUse) as caught:
        Store.open(path, store_key=KEY)
    assert time.monotonic() - started < 2
    assert caught.value.code == "store_in_use"
    assert "k" * 32 not in str(caught.value)
    first.apply(Batch(kv={"note": b"still usable"}), now_ms=1)       # the holder is unaffected
    first.close()
    again = Store.open(path, store_key=KEY)
    assert again.load().kv["note"] == b"still usable"
    again.close()


def test_a_store_only_read_so_far_is_held_too(tmp_path):
    path = tmp_path / "s.db"
    Store.create(path, store_key=KEY).close()
    reader = Store.open(path, store_key=KEY)
    reader.load()
    with pytest.raises(StoreInUse):
        Store.open(path, store_key=KEY)
    reader.close()


def test_another_process_is_refused_while_held_and_a_killed_holder_leaves_no_lock(tmp_path):
    path = tmp_path / "s.db"
    Store.create(path, store_key=KEY).close()
    holder = _child(path, "hold")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "opened"
        with pytest.raises(StoreInUse):
            Store.open(path, store_key=KEY)
        second = _child(path, "once")
        out, _ = second.communicate(timeout=30)
        assert (second.returncode, out.split()) == (3, ["in_use", "store_in_use"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)               # reaps it and closes its pipes
    store = Store.open(path, store_key=KEY)                       # the crash left nothing behind
    store.close()


async def test_opening_the_store_of_a_running_client_is_refused(world: World):
    ann = await world.register("ann")
    try:
        with pytest.raises(StoreInUse):
            await world.reopen("ann")
    finally:
        await ann.aclose()
    reopened = await world.reopen("ann")
    assert reopened.user == ann.user
    await reopened.aclose()
