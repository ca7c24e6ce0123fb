"""The embedded store: SQLite (stdlib ``sqlite3``) in WAL mode, for one machine.

``sqlite:///relative/path.db`` (relative to the working directory when the store is
created) or ``sqlite:////absolute/path.db`` -- the SQLAlchemy/Flask-SQLAlchemy
convention, so ``f"sqlite:///{absolute_path}"`` is always right. The file's directory is
created if missing and a new file gets mode 0600. Data persists across restarts.

Options: ``busy_timeout`` (seconds a write waits for another process's write,
default 5), ``cleanup_interval`` (seconds between sweeps of expired rows, default 60).

Connections are per process *and* per thread, opened lazily; a forked child notices the
pid change (or :meth:`SQLiteStore.after_fork`) and opens its own. Inherited
connections are never used nor closed in the child (closing one could disturb the
parent's locks or WAL), only kept referenced.

Schema: ``kv(key, value, expires)`` holds every key; a string has its bytes in
``value``, a hash has ``value`` NULL and its fields in ``hash(key, field, value)``.
So ``expire``/``ttl``/``delete`` work the same for strings and hashes, like Redis: a
hash's TTL covers the whole hash, ``hset`` keeps it, removing the last field removes
the key. Expiries are wall-clock (``time.time()``) since they outlive the process.
Expired rows are invisible to reads, replaced by writes and swept every
``cleanup_interval``. Locks are rows of ``locks(name, token, expires)``, apart from keys.

Every write (and every batch) is one ``BEGIN IMMEDIATE`` transaction, so ``incr``,
``hset`` and batches are atomic across processes. SQLite errors (locked too long, disk
I/O, can't open, not a database) become :class:`StoreUnavailable` naming the file.
Semantics are those of every backend (see :mod:`gunicorn_ext.state.store`): e.g. a
batch in which one command fails still commits the others, as on Redis.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .store import (
    Batch,
    Store,
    StoreError,
    StoreUnavailable,
    WrongType,
    add_counter,
    check_amount,
    check_lock_timeout,
    check_ttl,
    check_value,
    parse_counter,
)

T = TypeVar("T")

# Connections opened by a parent process: never closed in a forked child (see above).
_INHERITED: list[sqlite3.Connection] = []

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB, expires REAL);
CREATE INDEX IF NOT EXISTS kv_expires ON kv(expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS hash (key TEXT, field TEXT, value BLOB NOT NULL,
                                 PRIMARY KEY (key, field));
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, token TEXT NOT NULL,
                                  expires REAL NOT NULL);
"""


def _wrongtype(key: str) -> WrongType:
    return WrongType(f"WRONGTYPE: key {key!r} holds a value of another type")


def sqlite_path(url: str) -> str:
    """The absolute file path of a ``sqlite:///...`` URL."""
    prefix = "sqlite://"
    if not url.lower().startswith(prefix):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url[len(prefix):]
    if not rest.startswith("/") or rest in ("/", "//") or rest == "/:memory:":
        raise ValueError(
            f"bad sqlite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db")
    return os.path.abspath(rest[1:])


Op = Callable[[sqlite3.Connection, float], T]


class SQLiteBatch(Batch):
    """Queued commands run in one ``BEGIN IMMEDIATE`` transaction, results in order.
    Every command runs; if some fail (:class:`WrongType`, ``NotAnInteger``) the others
    are committed and the first error is raised, as on Redis."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._ops: list[tuple[str, tuple[Any, ...]]] = []

    def _add(self, name: str, *args: Any) -> SQLiteBatch:
        self._ops.append((name, args))
        return self

    def get(self, key: str) -> SQLiteBatch:
        return self._add("get", key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> SQLiteBatch:
        check_value(value)
        return self._add("set", key, value, None if ttl is None else check_ttl(ttl))

    def delete(self, *keys: str) -> SQLiteBatch:
        return self._add("delete", *keys)

    def incr(self, key: str, amount: int = 1) -> SQLiteBatch:
        return self._add("incr", key, check_amount(amount))

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> SQLiteBatch:
        return self._add("expire", key, check_ttl(ttl, allow_zero=True), bool(if_no_ttl))

    def hgetall(self, key: str) -> SQLiteBatch:
        return self._add("hgetall", key)

    def hset(self, key: str, mapping: dict[str, bytes]) -> SQLiteBatch:
        for value in mapping.values():
            check_value(value)
        return self._add("hset", key, dict(mapping))

    def hdel(self, key: str, *fields: str) -> SQLiteBatch:
        return self._add("hdel", key, *fields)

    def execute(self) -> list[Any]:
        ops, self._ops = self._ops, []
        if not ops:
            return []
        store = self._store

        errors: list[StoreError] = []

        def run(conn: sqlite3.Connection, now: float) -> list[Any]:
            results: list[Any] = []
            for name, args in ops:
                try:  # each op checks types before it writes: a failed one wrote nothing
                    results.append(getattr(store, "_" + name)(conn, now, *args))
                except StoreError as exc:
                    errors.append(exc)
                    results.append(exc)
            return results

        results = store._write(run)
        if errors:
            raise errors[0]
        return results


class SQLiteStore(Store):
    """``sqlite:///path``: SQLite in WAL mode, shared by all processes of one machine."""

    def __init__(self, url: str, *, busy_timeout: float = 5.0,
                 cleanup_interval: float = 60.0) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.busy_timeout = float(busy_timeout)
        self.cleanup_interval = float(cleanup_interval)
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._conns: dict[int, sqlite3.Connection] = {}  # thread ident -> connection
        self._schema_pid = 0
        self._last_cleanup = 0.0

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    # -- connections
    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite store {self.path!r} unavailable: {exc}")

    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Switching a fresh file to WAL takes an exclusive lock and SQLite does not
            # wait on it with the busy timeout, so workers (or threads) that start
            # together retry here instead of failing their first request.
            deadline = time.monotonic() + self.busy_timeout
            with self._mutex:
                while True:
                    try:
                        self._setup(conn)
                        break
                    except sqlite3.OperationalError as exc:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        text = str(exc)
                        if ("locked" not in text and "busy" not in text) or \
                                time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise self._unavailable(exc) from exc
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = NORMAL")
        if self._schema_pid != os.getpid():
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
            self._schema_pid = os.getpid()

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            self.after_fork()
        ident = threading.get_ident()
        conn = self._conns.get(ident)
        if conn is None:
            conn = self._open()
            with self._mutex:
                # Close the connections of threads that ended (same process: safe).
                alive = {t.ident for t in threading.enumerate()}
                for dead in [i for i in self._conns if i not in alive]:
                    self._conns.pop(dead).close()
                self._conns[ident] = conn
        return conn

    def _drop(self, exc: sqlite3.Error) -> None:
        """After an error other than a busy database, reopen on next use (the file may
        have been replaced, its disk remounted...)."""
        if "locked" in str(exc) or "busy" in str(exc):
            return
        with self._mutex:
            conn = self._conns.pop(threading.get_ident(), None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _read(self, op: Op[T]) -> T:
        conn = self._conn()
        try:
            return op(conn, time.time())
        except sqlite3.Error as exc:
            self._drop(exc)
            raise self._unavailable(exc) from exc

    def _write(self, op: Op[T]) -> T:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                result = op(conn, now)
                if now - self._last_cleanup >= self.cleanup_interval:
                    self._cleanup(conn, now)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        except sqlite3.Error as exc:
            self._drop(exc)
            raise self._unavailable(exc) from exc

    def _cleanup(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM hash WHERE key IN "
                     "(SELECT key FROM kv WHERE expires IS NOT NULL AND expires <= ?)", (now,))
        conn.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
        conn.execute("DELETE FROM locks WHERE expires <= ?", (now,))
        self._last_cleanup = now

    # -- operations: (conn, now, *args), run inside _read or _write
    @staticmethod
    def _row(conn: sqlite3.Connection, now: float, key: str) -> tuple[Any, Any] | None:
        """The live (value, expires) of ``key``, None if missing or expired."""
        row = conn.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= now):
            return None
        return row[0], row[1]

    @staticmethod
    def _purge(conn: sqlite3.Connection, key: str) -> bool:
        existed = conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount > 0
        conn.execute("DELETE FROM hash WHERE key = ?", (key,))
        return existed

    def _live_for_write(self, conn: sqlite3.Connection, now: float,
                        key: str) -> tuple[Any, Any] | None:
        row = conn.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is not None and row[1] is not None and row[1] <= now:
            self._purge(conn, key)
            return None
        return None if row is None else (row[0], row[1])

    def _get(self, conn: sqlite3.Connection, now: float, key: str) -> bytes | None:
        row = self._row(conn, now, key)
        if row is None:
            return None
        if row[0] is None:
            raise _wrongtype(key)
        return bytes(row[0])

    def _set(self, conn: sqlite3.Connection, now: float, key: str, value: bytes,
             ttl: float | None) -> None:
        conn.execute("DELETE FROM hash WHERE key = ?", (key,))
        conn.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                     (key, bytes(value), None if ttl is None else now + ttl))

    def _delete(self, conn: sqlite3.Connection, now: float, *keys: str) -> int:
        n = 0
        for key in keys:
            live = self._row(conn, now, key) is not None
            self._purge(conn, key)
            n += live
        return n

    def _incr(self, conn: sqlite3.Connection, now: float, key: str, amount: int) -> int:
        row = self._live_for_write(conn, now, key)
        if row is None:
            conn.execute("INSERT INTO kv (key, value, expires) VALUES (?, ?, NULL)",
                         (key, str(amount).encode()))
            return amount
        if row[0] is None:
            raise _wrongtype(key)
        new = add_counter(key, parse_counter(key, bytes(row[0])), int(amount))
        conn.execute("UPDATE kv SET value = ? WHERE key = ?", (str(new).encode(), key))
        return new

    def _expire(self, conn: sqlite3.Connection, now: float, key: str, ttl: float,
                if_no_ttl: bool = False) -> bool:
        row = self._live_for_write(conn, now, key)
        if row is None or (if_no_ttl and row[1] is not None):
            return False
        if ttl <= 0:
            self._purge(conn, key)
        else:
            conn.execute("UPDATE kv SET expires = ? WHERE key = ?", (now + ttl, key))
        return True

    def _ttl(self, conn: sqlite3.Connection, now: float, key: str) -> float | None:
        row = self._row(conn, now, key)
        if row is None or row[1] is None:
            return None
        return max(0.0, float(row[1]) - now)

    def _hgetall(self, conn: sqlite3.Connection, now: float, key: str) -> dict[str, bytes]:
        rows = conn.execute(
            "SELECT k.value IS NULL, h.field, h.value FROM kv k "
            "LEFT JOIN hash h ON h.key = k.key "
            "WHERE k.key = ? AND (k.expires IS NULL OR k.expires > ?)", (key, now)).fetchall()
        if not rows:
            return {}
        if not rows[0][0]:
            raise _wrongtype(key)
        return {field: bytes(value) for _, field, value in rows if field is not None}

    def _hset(self, conn: sqlite3.Connection, now: float, key: str,
              mapping: dict[str, bytes]) -> int:
        if not mapping:
            return 0
        row = self._live_for_write(conn, now, key)
        if row is None:
            conn.execute("INSERT INTO kv (key, value, expires) VALUES (?, NULL, NULL)", (key,))
            created = len(mapping)
        elif row[0] is not None:
            raise _wrongtype(key)
        else:
            fields = list(mapping)
            created = len(fields)
            for i in range(0, len(fields), 500):  # within SQLite's limit on parameters
                chunk = fields[i:i + 500]
                created -= conn.execute(
                    "SELECT COUNT(*) FROM hash WHERE key = ? AND field IN "
                    f"({','.join('?' * len(chunk))})", (key, *chunk)).fetchone()[0]
        conn.executemany("INSERT OR REPLACE INTO hash (key, field, value) VALUES (?, ?, ?)",
                         [(key, f, bytes(v)) for f, v in mapping.items()])
        return created

    def _hdel(self, conn: sqlite3.Connection, now: float, key: str, *fields: str) -> int:
        row = self._live_for_write(conn, now, key)
        if row is None:
            return 0
        if row[0] is not None:
            raise _wrongtype(key)
        n = 0
        for f in fields:
            n += conn.execute("DELETE FROM hash WHERE key = ? AND field = ?", (key, f)).rowcount
        if conn.execute("SELECT 1 FROM hash WHERE key = ? LIMIT 1", (key,)).fetchone() is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        return n

    # -- strings
    def get(self, key: str) -> bytes | None:
        return self._read(lambda c, now: self._get(c, now, key))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_value(value)
        if ttl is not None:
            check_ttl(ttl)
        self._write(lambda c, now: self._set(c, now, key, value, ttl))

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return self._write(lambda c, now: self._delete(c, now, *keys))

    def incr(self, key: str, amount: int = 1) -> int:
        check_amount(amount)
        return self._write(lambda c, now: self._incr(c, now, key, amount))

    def expire(self, key: str, ttl: float, if_no_ttl: bool = False) -> bool:
        check_ttl(ttl, allow_zero=True)
        nx = bool(if_no_ttl)
        return self._write(lambda c, now: self._expire(c, now, key, ttl, nx))

    def ttl(self, key: str) -> float | None:
        return self._read(lambda c, now: self._ttl(c, now, key))

    # -- hashes
    def hgetall(self, key: str) -> dict[str, bytes]:
        return self._read(lambda c, now: self._hgetall(c, now, key))

    def hset(self, key: str, mapping: dict[str, bytes]) -> int:
        for value in mapping.values():
            check_value(value)
        if not mapping:
            return 0
        return self._write(lambda c, now: self._hset(c, now, key, dict(mapping)))

    def hdel(self, key: str, *fields: str) -> int:
        return self._write(lambda c, now: self._hdel(c, now, key, *fields))

    def batch(self) -> SQLiteBatch:
        return SQLiteBatch(self)

    # -- locks
    def _try_lock(self, name: str, token: str, timeout: float) -> float | None:
        """Take the lock (None) or return when the current holder's lock expires."""

        def op(conn: sqlite3.Connection, now: float) -> float | None:
            row = conn.execute("SELECT expires FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now:
                return float(row[0])
            conn.execute("INSERT OR REPLACE INTO locks (name, token, expires) VALUES (?, ?, ?)",
                         (name, token, now + timeout))
            return None

        return self._write(op)

    def acquire(self, name: str, timeout: float, blocking_timeout: float | None = None) -> str | None:
        check_lock_timeout(timeout)
        token = secrets.token_hex(16)
        deadline = None if blocking_timeout is None else time.monotonic() + blocking_timeout
        pause = 0.005
        while True:
            held_until = self._try_lock(name, token, timeout)
            if held_until is None:
                return token
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait = min(pause, max(held_until - time.time(), 0.001))
            if deadline is not None:
                wait = min(wait, deadline - now)
            time.sleep(max(wait, 0.001))
            pause = min(pause * 2, 0.05)

    def release(self, name: str, token: str) -> bool:
        def op(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute("SELECT expires FROM locks WHERE name = ? AND token = ?",
                               (name, token)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM locks WHERE name = ?", (name,))
            return row is not None and row[0] > now

        return self._write(op)

    # -- lifecycle
    def ping(self) -> None:
        self._read(lambda c, now: c.execute("SELECT count(*) FROM kv").fetchone())

    def after_fork(self) -> None:
        """Forget the parent's connections (kept referenced, never closed, never used)."""
        _INHERITED.extend(self._conns.values())
        self._conns = {}
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        if os.getpid() != self._pid:
            self.after_fork()
            return
        with self._mutex:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
