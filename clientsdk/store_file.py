"""The client store's SQLite file: the one connection and its settings, and the few raw statements.

Split from ``clientsdk.store`` (which keeps the rows, their sealing and the snapshot):
how the file is opened and locked, how errors of the file read to the application,
and the multi-row statements the write path uses.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from clientsdk.errors import StoreCorrupted, StoreError, StoreInUse


def db_error(exc: Exception) -> StoreError:
    """What a database error means to the application: the store is in use, or unreadable."""
    cause = getattr(exc, "orig", exc)           # SQLAlchemy wraps the sqlite3 error
    if isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause):
        return StoreInUse("the store is open elsewhere (another process, or a client still running): "
                          "a device's store is used by one client at a time")
    return StoreCorrupted(f"store file is unreadable ({type(exc).__name__})")


ROWS_PER_STATEMENT = 500          # far below SQLite's limit of bound variables


def insert_rows(db: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]]) -> int:
    """``head VALUES (..), (..)``: one SQLite step (one GIL release) for many rows; returns rows changed."""
    changed = 0
    width = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        changed += db.execute(f"{head} VALUES {', '.join([width] * len(chunk))}",
                              [value for row in chunk for value in row]).rowcount
    return changed


def present_rows(db: sqlite3.Connection, table: str, rids: list[bytes]) -> set[bytes]:
    """Which of ``rids`` are in ``table`` (one SELECT per 500)."""
    found: set[bytes] = set()
    for start in range(0, len(rids), ROWS_PER_STATEMENT):
        chunk = rids[start:start + ROWS_PER_STATEMENT]
        found.update(row[0] for row in db.execute(
            f"SELECT rid FROM {table} WHERE rid IN ({', '.join('?' * len(chunk))})", chunk))
    return found


def open_engine(path: Path) -> sa.Engine:
    """The store's one connection, which holds the file exclusively until ``Store.close``.

    Two clients on one store would each advance their own copy of the same ratchets and
    encrypt different messages under the same message keys (and nonces): the first
    access takes an exclusive lock that is never released while open (SQLite's
    ``locking_mode=EXCLUSIVE``; in WAL mode it also keeps the WAL index in memory, no
    ``-shm`` file), so a second opener gets ``StoreInUse`` at once (``timeout``).  The OS
    drops the lock when a process dies, so a crash never leaves the store locked.
    """
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 0.2},
                              poolclass=sa.pool.StaticPool)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA locking_mode=EXCLUSIVE")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    return engine
