"""The in-process and SQLite stores: the shared contract, plus what only SQLite does
(persistence, several processes, forks, a broken file)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_contract import ALL_CHECKS

from gunicorn_ext.state.memory import MemoryStore
from gunicorn_ext.state.sqlite import SQLiteStore, sqlite_path
from gunicorn_ext.state.store import Store, StoreUnavailable, open_store


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore("memory://")
    else:
        s = SQLiteStore(sqlite_url(tmp_path / "store.db"))
    yield s
    s.close()


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(store: Store, check: Callable[[Store], None]) -> None:
    check(store)


# Wrong types, bad counters, refused TTLs and failing batches: in the contract
# (check_wrong_type, check_not_an_integer, check_ttl_must_be_positive,
# check_batch_errors), the same on every backend.


# -- open_store and URLs

def test_store_interface_imports_no_backend() -> None:
    # state/store.py is the interface: importing it (and the package) loads no backend;
    # open_store imports the one a URL names, when it is asked for.
    code = ("import sys; import gunicorn_ext.state, gunicorn_ext.state.store as s; "
            "bad = [m for m in ('redis', 'sqlite3', 'gunicorn_ext.state.redis', "
            "'gunicorn_ext.state.sqlite', 'gunicorn_ext.state.memory', 'flask') if m in sys.modules]; "
            "assert not bad, bad; s.open_store('memory://'); "
            "assert 'gunicorn_ext.state.memory' in sys.modules and 'redis' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_open_store_dispatch(tmp_path: Path) -> None:
    m = open_store("memory://")
    assert isinstance(m, MemoryStore)
    path = tmp_path / "d.db"
    s = open_store(sqlite_url(path))
    assert isinstance(s, SQLiteStore)
    assert s.path == str(path)
    s.set("k", b"v")
    assert s.get("k") == b"v"
    s.close()


def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///rel.db") == str(tmp_path / "rel.db")
    assert sqlite_path("sqlite:///sub/rel.db") == str(tmp_path / "sub" / "rel.db")
    assert sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/x.db",
                "redis://x"):
        with pytest.raises(ValueError):
            sqlite_path(bad)


def test_sqlite_creates_dir_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    s = SQLiteStore(sqlite_url(path))
    s.set("k", b"v")
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    mode = s._conns[next(iter(s._conns))].execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    s.close()


# -- persistence

def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "p.db")
    s = SQLiteStore(url)
    s.set("plain", b"value")
    s.set("ttl", b"t", ttl=100)
    s.set("short", b"s", ttl=0.2)
    s.hset("h", {"a": b"1", "b": b"2"})
    s.expire("h", 100)
    s.incr("n", 7)
    assert s.acquire("lock", timeout=100, blocking_timeout=0) is not None
    s.close()
    time.sleep(0.3)

    s2 = SQLiteStore(url)
    assert s2.get("plain") == b"value"
    assert s2.get("ttl") == b"t"
    left = s2.ttl("ttl")
    assert left is not None and 98 < left <= 100
    assert s2.get("short") is None
    assert s2.hgetall("h") == {"a": b"1", "b": b"2"}
    left = s2.ttl("h")
    assert left is not None and 98 < left <= 100
    assert s2.incr("n") == 8
    assert s2.acquire("lock", timeout=1, blocking_timeout=0) is None  # still held
    s2.close()


def test_sqlite_cleanup_sweeps_expired_rows(tmp_path: Path) -> None:
    s = SQLiteStore(sqlite_url(tmp_path / "c.db"), cleanup_interval=0)
    s.set("gone", b"x", ttl=0.05)
    s.hset("hgone", {"f": b"v"})
    s.expire("hgone", 0.05)
    s.acquire("lgone", timeout=0.05)
    time.sleep(0.1)
    s.set("other", b"y")  # any write sweeps
    conn = next(iter(s._conns.values()))
    assert conn.execute("SELECT key FROM kv").fetchall() == [("other",)]
    assert conn.execute("SELECT count(*) FROM hash").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 0
    s.close()


# -- several processes

def run_children(n: int, child: Callable[[int], object]) -> list[object]:
    """Fork ``n`` children running ``child(i)``; return their JSON results in order."""
    pids = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                os.close(r)
                out = json.dumps({"ok": child(i)})
            except BaseException as exc:  # noqa: BLE001
                out = json.dumps({"error": repr(exc)})
                code = 1
            try:
                os.write(w, out.encode())
            finally:
                os._exit(code)
        os.close(w)
        pids.append((pid, r))
    results = []
    for pid, r in pids:
        with os.fdopen(r, "rb") as f:
            data = json.loads(f.read() or b'{"error": "no output"}')
        _, status = os.waitpid(pid, 0)
        assert "error" not in data, data["error"]
        assert os.waitstatus_to_exitcode(status) == 0
        results.append(data["ok"])
    return results


def test_sqlite_concurrent_incr_across_processes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "n.db")
    SQLiteStore(url).set("warm", b"1")  # create the file and schema once

    def child(i: int) -> int:
        s = SQLiteStore(url)
        last = 0
        for _ in range(200):
            last = s.incr("counter")
        s.close()
        return last

    results = run_children(4, child)
    assert SQLiteStore(url).get("counter") == b"800"
    assert max(results) == 800  # type: ignore[type-var]


def test_sqlite_concurrent_incr_inherited_store(tmp_path: Path) -> None:
    """The parent's open store, used in forked children, reconnects in each."""
    s = SQLiteStore(sqlite_url(tmp_path / "f.db"))
    s.set("parent", b"p")  # the parent has an open connection now
    parent_conn = next(iter(s._conns.values()))

    def child(i: int) -> list[object]:
        seen = s.get("parent")
        for _ in range(100):
            s.incr("counter")
        fresh = next(iter(s._conns.values())) is not parent_conn
        return [seen.decode() if seen else None, fresh]

    assert run_children(3, child) == [["p", True]] * 3
    # The parent's connection still works after the children used (and left) theirs.
    assert next(iter(s._conns.values())) is parent_conn
    assert s.get("counter") == b"300"
    s.after_fork()  # explicit: drops (without closing) the connections
    assert s._conns == {}
    assert s.get("counter") == b"300"
    s.close()


def test_sqlite_lock_across_processes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "l.db")
    s = SQLiteStore(url)

    # Held by the parent: a child can't take it, then takes it once it is released.
    token = s.acquire("job", timeout=30, blocking_timeout=0)
    assert token is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            c = SQLiteStore(url)
            immediate = c.acquire("job", timeout=5, blocking_timeout=0)
            start = time.monotonic()
            got = c.acquire("job", timeout=5, blocking_timeout=5)
            waited = time.monotonic() - start
            if got is not None:
                c.release("job", got)
            os.write(w, json.dumps([immediate, got is not None, waited]).encode())
        finally:
            os._exit(0)
    os.close(w)
    time.sleep(0.4)
    assert s.release("job", token) is True
    with os.fdopen(r, "rb") as f:
        immediate, got, waited = json.loads(f.read())
    os.waitpid(pid, 0)
    assert immediate is None
    assert got is True
    assert 0.2 < waited < 3

    # Held by a process that exits without releasing: it frees itself after the timeout.
    def child(i: int) -> bool:
        return SQLiteStore(url).acquire("crash", timeout=0.4, blocking_timeout=0) is not None

    assert run_children(1, child) == [True]
    assert s.acquire("crash", timeout=5, blocking_timeout=0) is None
    start = time.monotonic()
    assert s.acquire("crash", timeout=5, blocking_timeout=3) is not None
    assert time.monotonic() - start < 1.5
    s.close()


# -- a broken or unreachable file

def test_sqlite_unwritable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / "sub" / "x.db"
    s = SQLiteStore(sqlite_url(path))  # lazy: constructing never fails
    with pytest.raises(StoreUnavailable) as info:
        s.get("k")
    assert str(path) in str(info.value)
    with pytest.raises(StoreUnavailable):
        s.ping()


def test_sqlite_corrupt_file_then_recovery(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not an sqlite database at all" * 200)
    s = SQLiteStore(sqlite_url(path))
    with pytest.raises(StoreUnavailable) as info:
        s.set("k", b"v")
    assert str(path) in str(info.value)
    with pytest.raises(StoreUnavailable):
        s.ping()
    # Recovery is automatic once the file is fixed: no stale connection kept.
    path.unlink()
    s.set("k", b"v")
    assert s.get("k") == b"v"
    s.close()


def test_sqlite_busy_database_is_unavailable(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "busy.db"
    s = SQLiteStore(sqlite_url(path), busy_timeout=0.2)
    s.set("k", b"v")
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # hold the write lock
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            s.set("k", b"w")
        assert time.monotonic() - start < 2
        assert str(path) in str(info.value) and "locked" in str(info.value)
        assert s.get("k") == b"v"  # WAL: reads go on during a write
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.set("k", b"w")
    assert s.get("k") == b"w"
    s.close()


# -- arbitrary keys and values round-trip

_DB_DIR = tempfile.mkdtemp(prefix="store-hypothesis-")
_HYPO_STORE = SQLiteStore(f"sqlite:///{_DB_DIR}/h.db")
_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_text, value=st.binary(max_size=2000),
       mapping=st.dictionaries(_text, st.binary(max_size=200), min_size=1, max_size=8))
def test_sqlite_roundtrip_arbitrary(key: str, value: bytes, mapping: dict[str, bytes]) -> None:
    s = _HYPO_STORE
    s.set("s:" + key, value)
    assert s.get("s:" + key) == value
    s.hset("h:" + key, mapping)
    assert s.hgetall("h:" + key) == mapping
    assert s.batch().get("s:" + key).hgetall("h:" + key).execute() == [value, mapping]
    assert s.delete("s:" + key, "h:" + key) == 2
