"""The database handle: one writer task with group commit, reads beside it.

SQLAlchemy's async layer does not run under trio, so the sync engine is driven
from threads, and never once per message (a thread hop costs ~230 µs here):
every write op waiting in the queue when the writer wakes is run in ONE
transaction, each op inside its own SAVEPOINT, then committed with one fsync
(``synchronous=FULL``).  A caller is woken only after that commit returned, so
an acknowledged write is durable.

Where the batch's statements run: the writer owns one connection and one OS
thread.  A batch of *quick* ops (``queue(..., quick=True)``: a few indexed
statements that never wait, the per-message hot path) on SQLite runs its
statements on the trio thread, and only the COMMIT (the fsync) goes to the
writer thread; any other batch runs there whole.  Statements on the writer
thread each give up and retake the GIL, and with a busy trio thread every
retake can wait up to the 5 ms switch interval (relay bench: the thread hop of
a 3-op batch took 2.7 ms at half load, of a 53-op batch 38 ms at full load,
median; the commit itself ~1 ms and ~6 ms).  A batch below a quarter of
``max_batch`` first waits ``batch_wait_s`` for company: below full load each
batch's fixed cost (hop, BEGIN/COMMIT, fsync, wake-ups) outweighs its ops.

An op is a plain synchronous ``Callable[[Connection], T]``: it must do all its
work on the connection it is given, return fully materialised values (no open
result objects), and never be run twice; it may raise a domain error, which
rolls back its savepoint only and is raised to its own caller only.
"""

from __future__ import annotations

import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio
from sqlalchemy import Connection, Dialect, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from homeserver.storage.models import Completion, DatabaseClosed
from homeserver.storage.schema import migrate

T = TypeVar("T")
log = logging.getLogger("securechat.storage")

DEFAULT_URL = "sqlite:///securechat.db"
MAX_BATCH = 64
# A batch under a quarter of MAX_BATCH waits this long for more ops: each batch costs
# ~0.3 ms of CPU here whatever its size (storage-only loop at 600 msgs/s: 0.70 ms of
# CPU per message with no wait, 0.45 ms with 2 ms), more than a message's own work.
BATCH_WAIT_S = 0.002
QUEUE_SIZE = 4096          # queued write ops before ``write`` applies back-pressure
READ_THREADS = 4
BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "securechat_begin"     # execution option: the statement that opens a transaction


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
    quick: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Maybe[T] | None = None
    batch_error: BaseException | None = None
    callbacks: list[Callable[[], None]] | None = None     # ``on_done`` callers, run after ``done``

    def finish(self) -> None:
        """Wake the waiters, then run the ``on_done`` callbacks (in the writer task)."""
        self.done.set()
        callbacks, self.callbacks = self.callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:
                log.exception("completion callback failed")


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
        await self._pending.done.wait()
        return self.result_now()

    def on_done(self, callback: Callable[[], None]) -> bool:
        pending = self._pending
        if pending.done.is_set():
            callback()
        elif pending.callbacks is None:
            pending.callbacks = [callback]
        else:
            pending.callbacks.append(callback)
        return True

    def result_now(self) -> T:
        pending = self._pending
        if not pending.done.is_set():
            raise RuntimeError("result_now() before the write finished")
        if pending.batch_error is not None:
            raise WriteFailed("write transaction failed; nothing was committed") \
                from pending.batch_error
        if pending.result is None:       # the writer stopped before running it
            raise DatabaseClosed("storage is shutting down")
        # Not unwrap(): a completion may be awaited by several callers (coalesced acks).
        if isinstance(pending.result, outcome.Error):
            raise pending.result.error
        return pending.result.value


class _WriterThread:
    """The writer's own OS thread: runs one call at a time for the writer task.

    Cheaper than ``trio.to_thread.run_sync`` per batch (no thread-cache job, thread
    naming, context copy or limiter): a queue put, and one ``run_sync_soon`` back.
    A call cannot be abandoned: the awaiting task is woken only when it returned.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], trio.lowlevel.Task] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._loop, args=(token,), name="securechat-db-writer",
                                        daemon=True)
        self._thread.start()

    def _loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, task = job
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        # No cancellation point before the call: a batch whose ops ran must reach its commit.
        self._jobs.put((fn, trio.lowlevel.current_task()))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class Database:
    """A sync SQLAlchemy engine behind one group-committing writer task.

    Start the writer in a nursery (``await nursery.start(db.run)``), then call
    ``write``/``read`` from any task; ``aclose`` flushes what is queued.
    Counters ``batches``, ``ops``, ``largest_batch`` and ``inline_batches`` (batches
    whose statements ran on the trio thread) show group commit at work.
    """

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S,
                 queue_size: int = QUEUE_SIZE, read_threads: int = READ_THREADS) -> None:
        if max_batch < 1 or batch_wait_s < 0:
            raise ValueError("max_batch must be at least 1, batch_wait_s not negative")
        self.engine = engine
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._small_batch = max(1, max_batch // 4)
        self._send, self._receive = trio.open_memory_channel[_PendingOp[Any]](queue_size)
        self._write_limiter = trio.CapacityLimiter(1)
        self._shares_one_connection = isinstance(engine.pool, StaticPool)
        self._read_limiter = (self._write_limiter if self._shares_one_connection
                              else trio.CapacityLimiter(read_threads))
        self._is_sqlite = engine.dialect.name == "sqlite"
        self._thread = _WriterThread()
        self._conn: Connection | None = None       # the writer's connection, opened by ``run``
        self._accepting = True
        self._closed = False
        self._running = False
        self._stopped = trio.Event()
        self.batches = 0
        self.ops = 0
        self.largest_batch = 0
        self.inline_batches = 0

    # --- public API ---------------------------------------------------------------------------

    async def write(self, op: Callable[[Connection], T]) -> T:
        """Queue ``op`` for the writer; return its result once it is committed.

        Raises the op's own exception, ``WriteFailed`` if its batch did not
        commit, ``DatabaseClosed`` once shutdown began.  A caller cancelled
        after queueing does not learn whether its op committed.
        """
        return await (await self.queue(op)).result()

    async def queue(self, op: Callable[[Connection], T],
                    on_commit: Callable[[T], None] | None = None, *,
                    quick: bool = False) -> Completion[T]:
        """Queue ``op`` now and return a handle to await its committed result later.

        Ops queued by one task run in the order it queued them, so a connection
        can pipeline writes (queue in arrival order, await results concurrently).
        ``on_commit`` runs in the writer task, in commit order, right after the
        commit and before any waiter wakes: the place for ordered side effects
        such as pushing new mailbox entries.  ``quick``: the op only runs a few
        indexed statements and never waits on anything else, so on SQLite it may
        run on the trio thread (see the module docstring).
        """
        if not self._accepting:
            raise DatabaseClosed("storage is shutting down")
        pending: _PendingOp[T] = _PendingOp(op, on_commit, quick)
        try:
            try:
                self._send.send_nowait(pending)     # no scheduling round trip when there is room
            except trio.WouldBlock:
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
        self._thread.start()
        try:
            task_status.started()
            async for first in self._receive:
                batch: list[_PendingOp[Any]] = [first]
                self._take_queued(batch)
                try:      # every op taken is finished, even if cancelled (then: DatabaseClosed)
                    if len(batch) < self._small_batch and self._batch_wait_s > 0:
                        await trio.sleep(self._batch_wait_s)      # fill a small batch (docstring)
                        self._take_queued(batch)
                    if self._shares_one_connection:      # reads use the same connection
                        async with self._write_limiter:
                            await self._write_batch(batch)
                    else:
                        await self._write_batch(batch)
                finally:
                    self.batches += 1
                    self.ops += len(batch)
                    self.largest_batch = max(self.largest_batch, len(batch))
                    for pending in batch:
                        _run_on_commit(pending)
                    for pending in batch:
                        pending.finish()
        finally:
            self._accepting = False
            self._fail_queued()
            with trio.CancelScope(shield=True):
                if self._conn is not None:
                    await self._thread.run(self._drop_connection)
            self._thread.stop()
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

    # --- one batch ----------------------------------------------------------------------------

    def _take_queued(self, batch: list[_PendingOp[Any]]) -> None:
        while len(batch) < self._max_batch:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def _write_batch(self, batch: list[_PendingOp[Any]]) -> None:
        """Run the batch in one transaction and commit it; every outcome lands in ``batch``."""
        if self._conn is None:
            self._conn = await self._thread.run(self._connect_writer)
        conn = self._conn
        if self._is_sqlite and all(p.quick for p in batch) and self._begin_without_waiting(conn):
            self.inline_batches += 1
            try:
                self._apply(conn, batch)
            except Exception as exc:  # noqa: BLE001 -- any failure here fails the batch, as a failed commit does
                await self._thread.run(functools.partial(self._abort, conn, batch, exc))
                return
            await self._thread.run(functools.partial(self._commit, conn, batch))
        else:
            await self._thread.run(functools.partial(self._begin_apply_commit, conn, batch))

    def _begin_without_waiting(self, conn: Connection) -> bool:
        """Trio thread: BEGIN IMMEDIATE, unless another process holds the write lock.

        A held lock would make SQLite wait up to ``busy_timeout`` here, blocking
        the event loop; instead the batch goes to the writer thread, which waits.
        """
        driver = conn.connection.driver_connection
        if not isinstance(driver, sqlite3.Connection):
            return False
        driver.execute("PRAGMA busy_timeout=0")
        try:
            conn.begin()
            return True
        except DBAPIError:        # SQLITE_BUSY: nothing has run
            return False
        finally:
            driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")

    def _apply(self, conn: Connection, batch: list[_PendingOp[Any]]) -> None:
        """Every op in its own SAVEPOINT; an op's own error rolls back only that op."""
        # Plain SQL savepoints on the driver's cursor: the same text on SQLite
        # and PostgreSQL, and far cheaper than begin_nested() (~240 µs here).
        cursor = conn.connection.cursor()
        try:
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
        finally:
            cursor.close()

    # --- writer-thread side -------------------------------------------------------------------

    def _begin_apply_commit(self, conn: Connection, batch: list[_PendingOp[Any]]) -> None:
        try:
            conn.begin()
            self._apply(conn, batch)
        except Exception as exc:
            self._abort(conn, batch, exc)
            return
        self._commit(conn, batch)

    def _commit(self, conn: Connection, batch: list[_PendingOp[Any]]) -> None:
        try:
            conn.commit()
        except Exception as exc:  # commit failed: nothing of the batch is durable
            self._abort(conn, batch, exc)

    def _abort(self, conn: Connection, batch: list[_PendingOp[Any]], exc: BaseException) -> None:
        """The batch failed as a whole: fail every op that had not failed on its own, roll back."""
        for pending in batch:
            if pending.result is None or isinstance(pending.result, outcome.Value):
                pending.batch_error = exc
                pending.result = None
        try:
            conn.rollback()
        except Exception:
            log.warning("rollback after a failed batch failed; reopening the writer connection")
        # A fresh connection for the next batch: nothing of this one's state carries over.
        self._drop_connection()

    def _connect_writer(self) -> Connection:
        conn = self.engine.connect()
        if self._is_sqlite:
            conn.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.warning("closing the writer connection failed")

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
            pending.finish()        # result stays None: the caller gets DatabaseClosed


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
        # The writer's connection asks for BEGIN IMMEDIATE (it writes anyway, and a
        # lock taken up front can be probed without waiting); reads use plain BEGIN.
        conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


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


def open_database(url: str = DEFAULT_URL, *, max_batch: int = MAX_BATCH,
                  batch_wait_s: float = BATCH_WAIT_S) -> Database:
    """Open (and migrate) the database at ``url``; start ``Database.run`` before writing."""
    return Database(create_storage_engine(url), max_batch=max_batch, batch_wait_s=batch_wait_s)

