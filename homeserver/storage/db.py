"""The database handle: one writer task with group commit, reads beside it.

SQLAlchemy's async layer does not run under trio, so the sync engine is driven
through ``trio.to_thread``, and never once per message (a thread hop costs
~230 µs here): every write op waiting in the queue when the writer wakes is run
in ONE worker-thread call and ONE transaction, each op inside its own SAVEPOINT,
then committed with one fsync (``synchronous=FULL``).  A caller is woken only
after that commit returned, so an acknowledged write is durable.

An op is a plain synchronous ``Callable[[Connection], T]``: it must do all its
work on the connection it is given, return fully materialised values (no open
result objects), and never be run twice; it may raise a domain error, which
rolls back its savepoint only and is raised to its own caller only.
"""

from __future__ import annotations

import logging

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio
from sqlalchemy import Connection, Dialect, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.pool import StaticPool

from homeserver.storage.models import Completion, DatabaseClosed
from homeserver.storage.schema import migrate

T = TypeVar("T")
log = logging.getLogger("securechat.storage")

DEFAULT_URL = "sqlite:///securechat.db"
MAX_BATCH = 64
QUEUE_SIZE = 4096          # queued write ops before ``write`` applies back-pressure
READ_THREADS = 4
BUSY_TIMEOUT_MS = 10_000


class Prepared:
    """A Core statement compiled once per dialect and run straight on the DBAPI cursor.

    Only for the few statements on the per-message hot path: going through
    ``Connection.execute`` costs ~50 µs per statement here, the driver ~5 µs,
    which decides how many messages a core can relay.  The SQL text still comes
    from SQLAlchemy's compiler for the connection's dialect (portable), and bind
    processors are applied; results are plain DBAPI tuples (no result
    processors: callers convert).  Every parameter must be a named
    ``bindparam``, without ``IN`` expansion.
    """

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, tuple[str, list[tuple[str, Any]], bool]] = {}

    def _for(self, dialect: Dialect) -> tuple[str, list[tuple[str, Any]], bool]:
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            if not isinstance(compiled, SQLCompiler):
                raise TypeError("Prepared takes a SQL statement (select/insert/update/delete)")
            names = list(compiled.positiontup or ()) if dialect.positional else list(compiled.binds)
            binds = [(name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                     for name in names]
            found = (str(compiled), binds, bool(dialect.positional))
            self._compiled[dialect.name] = found
        return found

    def _execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        sql, binds, positional = self._for(conn.dialect)
        values = [params[name] if process is None else process(params[name])
                  for name, process in binds]
        cursor = conn.connection.cursor()
        if positional:
            cursor.execute(sql, values)
        else:
            cursor.execute(sql, {name: value for (name, _), value in zip(binds, values, strict=True)})
        return cursor

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        cursor = self._execute(conn, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        cursor = self._execute(conn, params)
        try:
            row = cursor.fetchone()
            return None if row is None else tuple(row)
        finally:
            cursor.close()

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        cursor = self._execute(conn, params)
        try:
            return [tuple(row) for row in cursor.fetchall()]
        finally:
            cursor.close()


class WriteFailed(Exception):
    """The batch transaction holding this op failed (commit or a broken transaction).

    Nothing of the op was committed; the original error is in ``__cause__``.
    """


class _BrokenTransaction(Exception):
    """An op ended the enclosing transaction behind the writer's back."""


@dataclass(slots=True, eq=False)
class _PendingOp(Generic[T]):
    op: Callable[[Connection], T]
    on_commit: Callable[[T], None] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[T] | None = None
    batch_error: BaseException | None = None


def _run_on_commit(pending: _PendingOp[Any]) -> None:
    if pending.on_commit is None or pending.batch_error is not None:
        return
    if isinstance(pending.result, outcome.Value):
        try:
            pending.on_commit(pending.result.value)
        except Exception:
            log.exception("on_commit callback failed")


class _QueuedWrite(Completion[T]):
    def __init__(self, pending: _PendingOp[T]) -> None:
        self._pending = pending

    async def result(self) -> T:
        pending = self._pending
        await pending.done.wait()
        if pending.batch_error is not None:
            raise WriteFailed("write transaction failed; nothing was committed") \
                from pending.batch_error
        if pending.result is None:       # the writer stopped before running it
            raise DatabaseClosed("storage is shutting down")
        # Not unwrap(): a completion may be awaited by several callers (coalesced acks).
        if isinstance(pending.result, outcome.Error):
            raise pending.result.error
        return pending.result.value


class Database:
    """A sync SQLAlchemy engine behind one group-committing writer task.

    Start the writer in a nursery (``await nursery.start(db.run)``), then call
    ``write``/``read`` from any task; ``aclose`` flushes what is queued.
    Counters ``batches``, ``ops`` and ``largest_batch`` show group commit at work.
    """

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH,
                 queue_size: int = QUEUE_SIZE, read_threads: int = READ_THREADS) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.engine = engine
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_PendingOp[Any]](queue_size)
        self._write_limiter = trio.CapacityLimiter(1)
        shares_one_connection = isinstance(engine.pool, StaticPool)
        self._read_limiter = (self._write_limiter if shares_one_connection
                              else trio.CapacityLimiter(read_threads))
        self._is_sqlite = engine.dialect.name == "sqlite"
        self._accepting = True
        self._closed = False
        self._running = False
        self._stopped = trio.Event()
        self.batches = 0
        self.ops = 0
        self.largest_batch = 0

    # --- public API ---------------------------------------------------------------------------

    async def write(self, op: Callable[[Connection], T]) -> T:
        """Queue ``op`` for the writer; return its result once it is committed.

        Raises the op's own exception, ``WriteFailed`` if its batch did not
        commit, ``DatabaseClosed`` once shutdown began.  A caller cancelled
        after queueing does not learn whether its op committed.
        """
        return await (await self.queue(op)).result()

    async def queue(self, op: Callable[[Connection], T],
                    on_commit: Callable[[T], None] | None = None) -> Completion[T]:
        """Queue ``op`` now and return a handle to await its committed result later.

        Ops queued by one task run in the order it queued them, so a connection
        can pipeline writes (queue in arrival order, await results concurrently).
        ``on_commit`` runs in the writer task, in commit order, right after the
        commit and before any waiter wakes: the place for ordered side effects
        such as pushing new mailbox entries.
        """
        if not self._accepting:
            raise DatabaseClosed("storage is shutting down")
        pending: _PendingOp[T] = _PendingOp(op, on_commit)
        try:
            await self._send.send(pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise DatabaseClosed("storage is shutting down") from None
        return _QueuedWrite(pending)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one read transaction on a worker thread, beside the writer (WAL)."""
        if self._closed:
            raise DatabaseClosed("storage is closed")
        return await trio.to_thread.run_sync(self._run_read, fn, limiter=self._read_limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The single writer; returns once ``aclose`` was called and the queue is flushed."""
        if self._running or self._closed:
            raise RuntimeError("the writer can run only once")
        self._running = True
        task_status.started()
        try:
            async for first in self._receive:
                batch: list[_PendingOp[Any]] = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await trio.to_thread.run_sync(self._commit_batch, batch,
                                                  limiter=self._write_limiter)
                finally:
                    self.batches += 1
                    self.ops += len(batch)
                    self.largest_batch = max(self.largest_batch, len(batch))
                    for pending in batch:
                        _run_on_commit(pending)
                    for pending in batch:
                        pending.done.set()
        finally:
            self._accepting = False
            self._fail_queued()
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop accepting writes, flush every queued op, wait for the writer, close."""
        if self._closed:
            return
        self._accepting = False
        await self._send.aclose()
        if self._running:
            await self._stopped.wait()
        else:
            self._fail_queued()
        self._closed = True
        await trio.to_thread.run_sync(self.engine.dispose, limiter=self._write_limiter)

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- worker-thread side -------------------------------------------------------------------

    def _commit_batch(self, batch: list[_PendingOp[Any]]) -> None:
        """One transaction for the batch, one SAVEPOINT per op, one commit."""
        try:
            with self.engine.connect() as conn, conn.begin():
                # Plain SQL savepoints on the driver's cursor: the same text on SQLite
                # and PostgreSQL, and far cheaper than begin_nested() (~240 µs here).
                cursor = conn.connection.cursor()
                for pending in batch:
                    cursor.execute("SAVEPOINT write_op")
                    try:
                        value = pending.op(conn)
                    except Exception as exc:   # the op's own error: only its savepoint rolls back
                        pending.result = outcome.Error(exc)
                        cursor.execute("ROLLBACK TO SAVEPOINT write_op")
                    else:
                        pending.result = outcome.Value(value)
                    cursor.execute("RELEASE SAVEPOINT write_op")
                    if not self._transaction_alive(conn):
                        raise _BrokenTransaction("an op ended the batch transaction")
        except Exception as exc:  # commit (or the transaction) failed: nothing of the batch is durable
            for pending in batch:
                if pending.result is None or isinstance(pending.result, outcome.Value):
                    pending.batch_error = exc
                    pending.result = None

    def _transaction_alive(self, conn: Connection) -> bool:
        if self._is_sqlite:
            driver = conn.connection.driver_connection
            return isinstance(driver, sqlite3.Connection) and driver.in_transaction
        return conn.in_transaction()

    def _run_read(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn, conn.begin():
            return fn(conn)

    def _fail_queued(self) -> None:
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            pending.done.set()      # result stays None: the caller gets DatabaseClosed


# --- opening ------------------------------------------------------------------------------------


def _is_memory_sqlite(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _install_sqlite_setup(engine: Engine) -> None:
    """WAL, fsynced commits, foreign keys; and SQLAlchemy, not pysqlite, emits BEGIN.

    pysqlite's own transaction handling skips BEGIN before SAVEPOINT and DDL,
    which breaks savepoints (SQLAlchemy docs, "Transactions with SQLite").
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")


def create_storage_engine(url: str = DEFAULT_URL) -> Engine:
    """Create the engine for ``url`` and migrate its schema (blocking: call from a thread)."""
    if make_url(url).get_backend_name() == "sqlite":
        if _is_memory_sqlite(url):
            engine = create_engine(url, poolclass=StaticPool,
                                   connect_args={"check_same_thread": False})
        else:
            engine = create_engine(url, connect_args={"check_same_thread": False})
        _install_sqlite_setup(engine)
    else:
        engine = create_engine(url)
    try:
        with engine.connect() as conn:
            migrate(conn)
    except BaseException:
        engine.dispose()
        raise
    return engine


def open_database(url: str = DEFAULT_URL, *, max_batch: int = MAX_BATCH) -> Database:
    """Open (and migrate) the database at ``url``; start ``Database.run`` before writing."""
    return Database(create_storage_engine(url), max_batch=max_batch)

