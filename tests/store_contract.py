"""The behaviour every :class:`gunicorn_ext.state.store.Store` backend must share.

Plain functions taking a fresh, empty store, so any backend's tests can run them::

    @pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
    def test_contract(store, check):
        check(store)

Every check uses its own keys (prefixed ``contract:``), short TTLs and few sleeps; the
whole list takes about 2 s per backend.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest

from gunicorn_ext.state.store import (
    LockTimeout,
    NotAnInteger,
    Store,
    StoreError,
    WrongType,
)

SHORT = 0.3  # seconds: a TTL that expires within the test
WAIT = SHORT + 0.15  # how long to sleep to be past it


def check_strings(store: Store) -> None:
    assert store.get("contract:s:missing") is None
    store.set("contract:s:a", b"one")
    assert store.get("contract:s:a") == b"one"
    store.set("contract:s:a", b"two")
    assert store.get("contract:s:a") == b"two"
    store.set("contract:s:empty", b"")
    assert store.get("contract:s:empty") == b""
    binary = bytes(range(256)) * 4
    store.set("contract:s:bin", binary)
    assert store.get("contract:s:bin") == binary
    store.set("contract:s:unicode-é✓", b"x")
    assert store.get("contract:s:unicode-é✓") == b"x"
    assert store.get("contract:s:unicode-e") is None
    assert isinstance(store.get("contract:s:a"), bytes)


def check_delete(store: Store) -> None:
    store.set("contract:d:a", b"1")
    store.set("contract:d:b", b"2")
    store.hset("contract:d:h", {"f": b"v"})
    assert store.delete("contract:d:missing") == 0
    assert store.delete("contract:d:a", "contract:d:missing", "contract:d:h") == 2
    assert store.get("contract:d:a") is None
    assert store.hgetall("contract:d:h") == {}
    assert store.get("contract:d:b") == b"2"
    assert store.delete("contract:d:a") == 0
    # An expired key no longer counts.
    store.set("contract:d:e", b"x", ttl=0.05)
    time.sleep(0.1)
    assert store.delete("contract:d:e") == 0


def check_ttl(store: Store) -> None:
    store.set("contract:t:forever", b"x")
    assert store.ttl("contract:t:forever") is None
    assert store.ttl("contract:t:missing") is None
    store.set("contract:t:short", b"x", ttl=SHORT)
    left = store.ttl("contract:t:short")
    assert left is not None and 0 < left <= SHORT
    store.set("contract:t:long", b"y", ttl=100)
    left = store.ttl("contract:t:long")
    assert left is not None and 99 < left <= 100
    # expire() touches an existing key and refuses a missing one.
    assert store.expire("contract:t:missing", 10) is False
    assert store.get("contract:t:missing") is None
    store.set("contract:t:touched", b"z", ttl=SHORT)
    assert store.expire("contract:t:touched", 100) is True
    store.set("contract:t:gains", b"g")
    assert store.expire("contract:t:gains", SHORT) is True
    # set() without ttl clears an existing TTL.
    store.set("contract:t:cleared", b"c", ttl=SHORT)
    store.set("contract:t:cleared", b"c2")
    assert store.ttl("contract:t:cleared") is None
    time.sleep(WAIT)
    assert store.get("contract:t:short") is None
    assert store.ttl("contract:t:short") is None
    assert store.expire("contract:t:short", 10) is False
    assert store.get("contract:t:gains") is None
    assert store.get("contract:t:touched") == b"z"
    assert store.get("contract:t:long") == b"y"
    assert store.get("contract:t:forever") == b"x"
    assert store.get("contract:t:cleared") == b"c2"
    # A key set again after expiring is a fresh key with no TTL.
    store.set("contract:t:short", b"again")
    assert store.get("contract:t:short") == b"again"
    assert store.ttl("contract:t:short") is None


def check_incr(store: Store) -> None:
    assert store.incr("contract:i:n") == 1
    assert store.incr("contract:i:n") == 2
    assert store.incr("contract:i:n", 10) == 12
    assert store.incr("contract:i:n", -20) == -8
    assert store.get("contract:i:n") == b"-8"
    store.set("contract:i:m", b"41")
    assert store.incr("contract:i:m") == 42
    # incr keeps an existing TTL; an expired counter restarts from 0 with no TTL.
    store.set("contract:i:ttl", b"5", ttl=SHORT)
    assert store.incr("contract:i:ttl") == 6
    left = store.ttl("contract:i:ttl")
    assert left is not None and 0 < left <= SHORT
    time.sleep(WAIT)
    assert store.get("contract:i:ttl") is None
    assert store.incr("contract:i:ttl", 3) == 3
    assert store.ttl("contract:i:ttl") is None


def check_incr_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                store.incr("contract:it:n")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get("contract:it:n") == b"200"


def check_hashes(store: Store) -> None:
    assert store.hgetall("contract:h:missing") == {}
    assert store.hset("contract:h:a", {"x": b"1", "y": b"2"}) == 2  # fields created
    assert store.hgetall("contract:h:a") == {"x": b"1", "y": b"2"}
    assert store.hset("contract:h:a", {"y": b"22", "z": b""}) == 1  # y only updated
    assert store.hset("contract:h:a", {"y": b"22"}) == 0  # unchanged: still counted as 0
    assert store.hset("contract:h:a", {}) == 0
    assert store.hset("contract:h:missing", {}) == 0
    assert store.hgetall("contract:h:missing") == {}
    assert store.hgetall("contract:h:a") == {"x": b"1", "y": b"22", "z": b""}
    assert store.hdel("contract:h:a", "x", "missing") == 1
    assert store.hgetall("contract:h:a") == {"y": b"22", "z": b""}
    assert store.hdel("contract:h:missing", "x") == 0
    # Hashes are independent of each other.
    store.hset("contract:h:b", {"x": b"other"})
    assert store.hgetall("contract:h:a") == {"y": b"22", "z": b""}
    # Removing the last field removes the key.
    assert store.hdel("contract:h:b", "x") == 1
    assert store.hgetall("contract:h:b") == {}
    assert store.delete("contract:h:b") == 0
    # set() replaces a hash with a string.
    store.hset("contract:h:c", {"f": b"v"})
    store.set("contract:h:c", b"str")
    assert store.get("contract:h:c") == b"str"
    store.delete("contract:h:c")
    assert store.hgetall("contract:h:c") == {}
    assert store.hset("contract:h:c", {"g": b"w"}) == 1
    assert store.hgetall("contract:h:c") == {"g": b"w"}
    # Many fields at once (past SQLite's limit on parameters of one statement).
    many = {f"f{i}": b"v" for i in range(1200)}
    assert store.hset("contract:h:many", many) == 1200
    assert store.hset("contract:h:many", {**many, "extra": b"x"}) == 1


def check_hash_ttl(store: Store) -> None:
    """A hash's TTL covers the whole hash; hset keeps it, like Redis."""
    store.hset("contract:ht:a", {"f": b"1"})
    assert store.ttl("contract:ht:a") is None
    assert store.expire("contract:ht:a", SHORT) is True
    left = store.ttl("contract:ht:a")
    assert left is not None and 0 < left <= SHORT
    store.hset("contract:ht:a", {"g": b"2"})
    left = store.ttl("contract:ht:a")
    assert left is not None and 0 < left <= SHORT
    store.hset("contract:ht:kept", {"f": b"1"})
    store.expire("contract:ht:kept", SHORT)
    assert store.expire("contract:ht:kept", 100) is True  # sliding expiry
    time.sleep(WAIT)
    assert store.hgetall("contract:ht:a") == {}
    assert store.ttl("contract:ht:a") is None
    assert store.expire("contract:ht:a", 10) is False
    assert store.hdel("contract:ht:a", "f") == 0
    assert store.hgetall("contract:ht:kept") == {"f": b"1"}
    # A hash written after expiring starts empty: the old fields are gone, and its
    # fields count as created (what tells a session save that its key vanished).
    assert store.hset("contract:ht:kept", {"f": b"1"}) == 0
    assert store.hset("contract:ht:a", {"new": b"3", "f": b"1"}) == 2
    assert store.hgetall("contract:ht:a") == {"new": b"3", "f": b"1"}
    assert store.ttl("contract:ht:a") is None


def check_expire_if_no_ttl(store: Store) -> None:
    """``expire(..., if_no_ttl=True)`` (Redis's NX) gives a TTL only to a key without one,
    and says whether it did: what tells a blind hash write that it created the key."""
    assert store.expire("contract:nx:missing", 100, if_no_ttl=True) is False
    assert store.get("contract:nx:missing") is None
    store.hset("contract:nx:h", {"f": b"v"})  # created: no TTL
    assert store.expire("contract:nx:h", 100, if_no_ttl=True) is True
    left = store.ttl("contract:nx:h")
    assert left is not None and 99 < left <= 100
    assert store.expire("contract:nx:h", 5, if_no_ttl=True) is False  # kept as it was
    left = store.ttl("contract:nx:h")
    assert left is not None and 99 < left <= 100
    store.set("contract:nx:s", b"x", ttl=SHORT)
    assert store.expire("contract:nx:s", 0, if_no_ttl=True) is False  # has a TTL: not deleted
    assert store.get("contract:nx:s") == b"x"
    store.set("contract:nx:z", b"x")
    assert store.expire("contract:nx:z", 0, if_no_ttl=True) is True  # no TTL: 0 deletes
    assert store.get("contract:nx:z") is None
    # In a batch: a write, then the guard, as the Flask session's write does.
    store.hset("contract:nx:old", {"a": b"1"})
    store.expire("contract:nx:old", 100)
    got = (store.batch()
           .hset("contract:nx:old", {"b": b"2"}).expire("contract:nx:old", 100, if_no_ttl=True)
           .hset("contract:nx:new", {"b": b"2"}).expire("contract:nx:new", 100, if_no_ttl=True)
           .execute())
    assert got == [1, False, 1, True]
    left = store.ttl("contract:nx:new")
    assert left is not None and 99 < left <= 100
    time.sleep(WAIT)
    assert store.expire("contract:nx:s", 100, if_no_ttl=True) is False  # expired: missing


def check_batch(store: Store) -> None:
    store.set("contract:b:old", b"o")
    results = (store.batch()
               .set("contract:b:a", b"1")
               .get("contract:b:a")
               .incr("contract:b:n", 5)
               .incr("contract:b:n")
               .expire("contract:b:a", 100)
               .expire("contract:b:missing", 100)
               .hset("contract:b:h", {"f": b"v"})
               .hgetall("contract:b:h")
               .hdel("contract:b:h", "f", "nope")
               .delete("contract:b:old", "contract:b:missing")
               .get("contract:b:old")
               .set("contract:b:t", b"t", ttl=SHORT)
               .execute())
    assert results == [None, b"1", 5, 6, True, False, 1, {"f": b"v"}, 1, 1, None, None]
    assert store.get("contract:b:a") == b"1"
    left = store.ttl("contract:b:a")
    assert left is not None and 99 < left <= 100
    left = store.ttl("contract:b:t")
    assert left is not None and 0 < left <= SHORT
    assert store.hgetall("contract:b:h") == {}
    assert store.batch().execute() == []


def check_lock(store: Store) -> None:
    token = store.acquire("contract:l:a", timeout=10, blocking_timeout=0)
    assert isinstance(token, str) and token
    # Held: another taker fails at once, or after waiting its blocking timeout.
    assert store.acquire("contract:l:a", timeout=10, blocking_timeout=0) is None
    start = time.monotonic()
    assert store.acquire("contract:l:a", timeout=10, blocking_timeout=0.2) is None
    assert time.monotonic() - start >= 0.15
    # Another name is independent.
    other = store.acquire("contract:l:b", timeout=10, blocking_timeout=0)
    assert other is not None
    assert store.release("contract:l:b", other) is True
    # Only the holder's token releases.
    assert store.release("contract:l:a", "not-the-token") is False
    assert store.acquire("contract:l:a", timeout=10, blocking_timeout=0) is None
    assert store.release("contract:l:a", token) is True
    assert store.release("contract:l:a", token) is False
    again = store.acquire("contract:l:a", timeout=10, blocking_timeout=0)
    assert again is not None and again != token
    assert store.release("contract:l:a", again) is True


def check_lock_expiry(store: Store) -> None:
    token = store.acquire("contract:le:a", timeout=SHORT, blocking_timeout=0)
    assert token is not None
    # A waiter gets the lock once the holder's timeout runs out.
    start = time.monotonic()
    taker = store.acquire("contract:le:a", timeout=10, blocking_timeout=3)
    waited = time.monotonic() - start
    assert taker is not None
    assert 0.1 < waited < 2
    # The first holder's lock had expired: releasing it says so and frees nothing.
    assert store.release("contract:le:a", token) is False
    assert store.acquire("contract:le:a", timeout=10, blocking_timeout=0) is None
    assert store.release("contract:le:a", taker) is True


def check_lock_wakes_on_release(store: Store) -> None:
    token = store.acquire("contract:lw:a", timeout=30, blocking_timeout=0)
    assert token is not None
    got: list[float] = []

    def waiter() -> None:
        start = time.monotonic()
        t = store.acquire("contract:lw:a", timeout=10, blocking_timeout=5)
        if t is not None:
            got.append(time.monotonic() - start)
            store.release("contract:lw:a", t)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.2)
    assert not got
    assert store.release("contract:lw:a", token) is True
    th.join(5)
    assert got and got[0] < 1.5


def check_lock_context(store: Store) -> None:
    with store.lock("contract:lc:a", timeout=10) as token:
        assert token
        with pytest.raises(LockTimeout):
            with store.lock("contract:lc:a", timeout=10, blocking_timeout=0):
                pass  # pragma: no cover
    with store.lock("contract:lc:a", timeout=10, blocking_timeout=0):
        pass
    with pytest.raises(RuntimeError):
        with store.lock("contract:lc:b", timeout=10):
            raise RuntimeError("boom")
    assert store.acquire("contract:lc:b", timeout=1, blocking_timeout=0) is not None


def check_ttl_must_be_positive(store: Store) -> None:
    """``set`` with a TTL that is not a finite number > 0 is refused before anything is
    written (a computed TTL that reached 0 is a bug to see, not a silent delete);
    ``expire`` with 0 or less deletes, as Redis's EXPIRE does."""
    store.set("contract:tv:a", b"keep")
    for bad in (0, 0.0, -1, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError):
            store.set("contract:tv:a", b"new", ttl=bad)
        with pytest.raises(ValueError):
            store.batch().set("contract:tv:b", b"queued", ttl=bad)
    assert store.get("contract:tv:a") == b"keep"
    assert store.ttl("contract:tv:a") is None
    # A batch refusing a command while queuing sent nothing.
    batch = store.batch().set("contract:tv:c", b"first")
    with pytest.raises(ValueError):
        batch.set("contract:tv:c", b"second", ttl=0)
    assert store.get("contract:tv:c") is None
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            store.expire("contract:tv:a", bad)
    assert store.get("contract:tv:a") == b"keep"
    assert store.expire("contract:tv:a", 0) is True
    assert store.get("contract:tv:a") is None
    assert store.expire("contract:tv:a", 0) is False
    store.hset("contract:tv:h", {"f": b"v"})
    assert store.batch().expire("contract:tv:h", -1).hgetall("contract:tv:h").execute() == [
        True, {}]
    # The smallest positive TTL is still a TTL, never "forever".
    store.set("contract:tv:tiny", b"x", ttl=0.0001)
    time.sleep(0.05)
    assert store.get("contract:tv:tiny") is None


def check_values_are_bytes(store: Store) -> None:
    for bad in ("text", 1, 1.5, None, bytearray(b"x"), memoryview(b"x")):
        with pytest.raises(TypeError):
            store.set("contract:vb:a", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            store.hset("contract:vb:h", {"f": bad})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            store.batch().set("contract:vb:a", bad)  # type: ignore[arg-type]
    assert store.get("contract:vb:a") is None
    assert store.hgetall("contract:vb:h") == {}


def check_wrong_type(store: Store) -> None:
    """A string used as a hash or the reverse: :class:`WrongType` (a StoreError and a
    TypeError) on every backend, and the data stays as it was."""
    store.set("contract:wt:s", b"abc")
    store.hset("contract:wt:h", {"f": b"v"})
    calls: list[Callable[[], object]] = [
        lambda: store.hgetall("contract:wt:s"),
        lambda: store.hset("contract:wt:s", {"f": b"v"}),
        lambda: store.hdel("contract:wt:s", "f"),
        lambda: store.get("contract:wt:h"),
        lambda: store.incr("contract:wt:h"),
    ]
    for call in calls:
        with pytest.raises(WrongType) as info:
            call()
        assert isinstance(info.value, StoreError) and isinstance(info.value, TypeError)
    assert store.get("contract:wt:s") == b"abc"
    assert store.hgetall("contract:wt:h") == {"f": b"v"}
    # Type-blind commands work on both kinds.
    assert store.expire("contract:wt:s", 100) is True
    assert store.expire("contract:wt:h", 100) is True
    assert store.ttl("contract:wt:h") is not None
    assert store.delete("contract:wt:s", "contract:wt:h") == 2


def check_not_an_integer(store: Store) -> None:
    """``incr`` reads a counter as Redis does: canonical decimal, signed 64-bit."""
    for i, raw in enumerate((b"abc", b"1.5", b"01", b"-0", b" 1", b"1 ", b"+1", b"",
                             b"9223372036854775808", b"-9223372036854775809")):
        key = f"contract:ni:{i}"
        store.set(key, raw)
        with pytest.raises(NotAnInteger) as info:
            store.incr(key)
        assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)
        assert store.get(key) == raw
    store.set("contract:ni:max", b"9223372036854775807")
    with pytest.raises(NotAnInteger):
        store.incr("contract:ni:max")
    assert store.get("contract:ni:max") == b"9223372036854775807"
    assert store.incr("contract:ni:max", -1) == 2**63 - 2
    store.set("contract:ni:min", b"-9223372036854775808")
    with pytest.raises(NotAnInteger):
        store.incr("contract:ni:min", -1)
    assert store.incr("contract:ni:zero", -(2**63)) == -(2**63)
    with pytest.raises(NotAnInteger):
        store.incr("contract:ni:big", 2**63)
    with pytest.raises(TypeError):
        store.incr("contract:ni:big", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.batch().incr("contract:ni:big", 1.0)  # type: ignore[arg-type]
    assert store.get("contract:ni:big") is None
    store.set("contract:ni:ok", b"-12")
    assert store.incr("contract:ni:ok") == -11


def check_batch_errors(store: Store) -> None:
    """Every command of a batch runs; the first error is raised after, the rest applied."""
    store.set("contract:be:s", b"text")
    store.hset("contract:be:h", {"f": b"v"})
    with pytest.raises(NotAnInteger):
        (store.batch().set("contract:be:a", b"1").incr("contract:be:s")
         .hgetall("contract:be:s").set("contract:be:b", b"2").execute())
    assert store.get("contract:be:a") == b"1"
    assert store.get("contract:be:b") == b"2"
    with pytest.raises(WrongType):
        (store.batch().get("contract:be:h").incr("contract:be:n").execute())
    assert store.get("contract:be:n") == b"1"
    assert store.get("contract:be:s") == b"text"
    # The store is usable right after a failed batch.
    assert store.batch().incr("contract:be:n").get("contract:be:s").execute() == [2, b"text"]


def check_lock_arguments(store: Store) -> None:
    """A lock's timeout must be a finite number > 0; a negative blocking timeout is
    "don't wait", like 0."""
    for bad in (0, -1, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            store.acquire("contract:la:a", timeout=bad, blocking_timeout=0)
        with pytest.raises(ValueError):
            with store.lock("contract:la:a", timeout=bad):
                pass  # pragma: no cover
    token = store.acquire("contract:la:a", timeout=10, blocking_timeout=-1)
    assert token is not None
    start = time.monotonic()
    assert store.acquire("contract:la:a", timeout=10, blocking_timeout=-1) is None
    assert time.monotonic() - start < 1.0
    assert store.release("contract:la:a", token) is True
    # A tiny timeout is still a lock that expires (never one that is held forever).
    assert store.acquire("contract:la:tiny", timeout=0.0001, blocking_timeout=0) is not None
    assert store.acquire("contract:la:tiny", timeout=10, blocking_timeout=2) is not None


def check_ping(store: Store) -> None:
    store.ping()


ALL_CHECKS: list[Callable[[Store], None]] = [
    check_strings,
    check_delete,
    check_ttl,
    check_incr,
    check_incr_threads,
    check_hashes,
    check_hash_ttl,
    check_expire_if_no_ttl,
    check_batch,
    check_lock,
    check_lock_expiry,
    check_lock_wakes_on_release,
    check_lock_context,
    check_ttl_must_be_positive,
    check_values_are_bytes,
    check_wrong_type,
    check_not_an_integer,
    check_batch_errors,
    check_lock_arguments,
    check_ping,
]
