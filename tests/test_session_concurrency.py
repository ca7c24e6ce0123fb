"""Sessions across real Gunicorn workers (gthread), real redis-server and SQLite, real HTTP.

Two overlapping requests change different session keys: Flask-Session 0.8 loses one (it
rewrites the whole blob, its #71); gunicorn_ext.state.flask keeps both (per-key writes).
Sliding expiry: what it costs in Redis commands, beside Flask-Session's in the same run."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

APPS = Path(__file__).parent / "apps"


def _overlapping_writes(g: Any) -> dict[str, str]:
    s = requests.Session()
    s.get(g.url("/set/start"), timeout=10).raise_for_status()  # creates the session
    cookies = s.cookies.get_dict()

    def hit(key: str) -> None:
        requests.get(g.url(f"/set/{key}"), params={"v": key, "sleep": "0.5"}, cookies=cookies,
                     timeout=10).raise_for_status()

    threads = [threading.Thread(target=hit, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return requests.get(g.url("/get"), cookies=cookies, timeout=10).json()  # type: ignore[no-any-return]


def _start(factory: Any, impl: str, url: str, root: Path, workers: int = 2, threads: int = 4,
           **extra: str) -> Any:
    env = {"SESSION_IMPL": impl, "STATE_URL": url, "PYTHONPATH": str(root), **extra}
    return factory("session_app:app", cwd=APPS, workers=workers, env=env,
                   args=["--worker-class", "gthread", "--threads", str(threads)])


def test_flask_session_loses_a_concurrent_write(gunicorn_factory: Any, redis_server: Any,
                                               repo_root: Path) -> None:
    g = _start(gunicorn_factory, "flask_session", redis_server.url, repo_root)
    got = _overlapping_writes(g)
    assert not {"a", "b"} <= set(got), got  # the baseline's known bug, shown


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_ours_keeps_both_concurrent_writes(gunicorn_factory: Any, redis_server: Any,
                                           repo_root: Path, tmp_path: Path, backend: str) -> None:
    url = redis_server.url if backend == "redis" else f"sqlite:///{tmp_path / 'sessions.db'}"
    g = _start(gunicorn_factory, "ours", url, repo_root)
    got = _overlapping_writes(g)
    assert got.get("a") == "a" and got.get("b") == "b" and got.get("start") == "1", got


def test_store_outage_gives_503_and_recovers(gunicorn_factory: Any, redis_server: Any,
                                            repo_root: Path) -> None:
    g = _start(gunicorn_factory, "ours", redis_server.url, repo_root)
    s = requests.Session()
    assert s.get(g.url("/set/x"), timeout=10).status_code == 200
    redis_server.kill()
    r = s.get(g.url("/get"), timeout=10)
    assert r.status_code == 503 and r.headers.get("Retry-After")
    assert r.json()["error"]
    assert s.get(g.url("/nosession"), timeout=10).status_code == 200  # untouched by the outage
    redis_server.start()
    r = s.get(g.url("/set/y"), timeout=10)
    assert r.status_code == 200  # recovered with no restart (the old data is gone with redis)
    assert "session store unavailable" in g.log_text() or "unavailable" in g.log_text()


def test_redis_killed_under_load(gunicorn_factory: Any, redis_server: Any, repo_root: Path) -> None:
    """Load on a session route and a plain route while redis-server is SIGKILLed and
    restarted: session requests answer 200 or 503 (never a 500 or a dropped connection),
    plain requests are never affected, and sessions work again after the restart."""
    import time

    g = _start(gunicorn_factory, "ours", redis_server.url, repo_root)
    seen: dict[str, dict[int, int]] = {"session": {}, "plain": {}}
    errors: list[str] = []
    stop = threading.Event()

    def load(kind: str, path: str) -> None:
        s = requests.Session()
        end = time.monotonic() + 20
        n = 0
        while not stop.is_set() and time.monotonic() < end and n < 5000:
            n += 1
            try:
                code = s.get(g.url(path), timeout=10).status_code
            except requests.RequestException as exc:
                errors.append(f"{kind}: {exc!r}")
                continue
            seen[kind][code] = seen[kind].get(code, 0) + 1

    threads = [threading.Thread(target=load, args=("session", "/set/k")),
               threading.Thread(target=load, args=("plain", "/nosession"))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    redis_server.kill()
    time.sleep(1.5)
    redis_server.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert set(seen["plain"]) == {200}
    assert set(seen["session"]) <= {200, 503} and seen["session"].get(503, 0) > 0
    r = requests.get(g.url("/set/after"), timeout=10)
    assert r.status_code == 200


def _redis_commands(client: Any) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT, PEXPIRE counted as EXPIRE,
    without our own probes and the clients' connection health checks (PING)."""
    stats = client.info("commandstats")
    got: dict[str, int] = {}
    for name, v in stats.items():
        name = name.removeprefix("cmdstat_")
        if name in ("info", "config|resetstat", "config", "ping"):
            continue
        name = "expire" if name == "pexpire" else name
        got[name] = got.get(name, 0) + int(v["calls"])
    return got


N_UNTOUCHED = 40


@pytest.mark.parametrize("interval", ["3600", "0"])
def test_sliding_expiry_costs_for_requests_that_never_touch_the_session(
        gunicorn_factory: Any, redis_server: Any, repo_root: Path, interval: str) -> None:
    """Untouched requests carrying a permanent session's cookie: the cookie is re-sent on
    each (as Flask does); within SESSION_REFRESH_INTERVAL Redis sees nothing, and with
    interval 0 one EXPIRE each, which really extends the TTL. Flask-Session, in the same
    run, loads and rewrites the whole session on every one of them."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    ours = _start(gunicorn_factory, "ours", redis_server.url, repo_root,
                  SESSION_REFRESH_INTERVAL=interval, SESSION_LIFETIME="600")
    theirs = _start(gunicorn_factory, "flask_session", redis_server.url, repo_root,
                    SESSION_LIFETIME="600")
    counts: dict[str, dict[str, int]] = {}
    for name, g in (("ours", ours), ("theirs", theirs)):
        s = requests.Session()
        s.get(g.url("/set/x"), timeout=10).raise_for_status()
        keys = r.keys("session:*")
        r.config_resetstat()
        for _ in range(N_UNTOUCHED):
            resp = s.get(g.url("/nosession"), timeout=10)
            assert resp.status_code == 200
            if name == "ours":
                assert "session=" in resp.headers.get("Set-Cookie", "")  # Flask re-sends it
                assert "Cookie" in resp.headers.get("Vary", "")
        counts[name] = _redis_commands(r)
        for key in keys:
            r.delete(key)
    expected = {} if interval == "3600" else {"expire": N_UNTOUCHED}
    assert counts["ours"] == expected, counts
    assert sum(counts["theirs"].values()) >= 2 * N_UNTOUCHED, counts  # GET + SET each
    print(f"Redis commands for {N_UNTOUCHED} untouched requests, interval {interval}s: "
          f"ours {counts['ours']}, Flask-Session {counts['theirs']}")

    if interval == "0":  # the EXPIRE really slides the TTL
        s = requests.Session()
        s.get(ours.url("/set/y"), timeout=10).raise_for_status()
        (key,) = r.keys("session:*")
        time.sleep(1.5)
        before = r.pttl(key)
        s.get(ours.url("/nosession"), timeout=10).raise_for_status()
        assert r.pttl(key) > before


def test_a_read_refreshes_in_its_own_round_trip(gunicorn_factory: Any, redis_server: Any,
                                                 repo_root: Path) -> None:
    """A request that loads a permanent session due for a refresh sends HGETALL and
    EXPIRE together (one pipeline); within the interval, HGETALL alone."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    for interval, expire in (("3600", 0), ("0", 5)):
        g = _start(gunicorn_factory, "ours", redis_server.url, repo_root,
                   SESSION_REFRESH_INTERVAL=interval)
        s = requests.Session()
        s.get(g.url("/set/x"), timeout=10).raise_for_status()
        r.config_resetstat()
        for _ in range(5):
            assert s.get(g.url("/get"), timeout=10).json() == {"x": "1"}
        got = _redis_commands(r)
        assert got.get("hgetall") == 5 and got.get("expire", 0) == expire, got
        assert set(got) <= {"hgetall", "expire"}, got
        g.stop()


def test_untouched_requests_with_a_session_ride_out_an_outage(
        gunicorn_factory: Any, redis_server: Any, repo_root: Path) -> None:
    """With a refresh due on every request (interval 0), requests that never touch the
    session still answer 200 while redis-server is down (their refresh is skipped, one
    log line each), and the refresh works again once it is back."""
    import redis

    g = _start(gunicorn_factory, "ours", redis_server.url, repo_root,
               SESSION_REFRESH_INTERVAL="0")
    s = requests.Session()
    s.get(g.url("/set/x"), timeout=10).raise_for_status()
    redis_server.kill()
    for _ in range(5):
        r = s.get(g.url("/nosession"), timeout=10)
        assert r.status_code == 200 and r.text == "no session needed"
        assert "Set-Cookie" not in r.headers  # not refreshed, not deleted
    assert s.get(g.url("/get"), timeout=10).status_code == 503  # one that needs it
    assert "session expiry not refreshed" in g.log_text()
    redis_server.start()  # empty: the old session is gone with it
    s.get(g.url("/set/y"), timeout=10).raise_for_status()
    client = redis.Redis.from_url(redis_server.url)
    (key,) = client.keys("session:*")
    client.config_resetstat()
    assert s.get(g.url("/nosession"), timeout=10).status_code == 200
    assert _redis_commands(client) == {"expire": 1}
    assert client.exists(key)


def _reads(client: Any) -> int:
    """Reads redis-server has processed: one per client round trip (INFO's own included)."""
    return int(client.info("stats")["total_reads_processed"])


@pytest.mark.parametrize("interval", ["3600", "0"])
def test_round_trips_per_request_kind(gunicorn_factory: Any, redis_server: Any,
                                      repo_root: Path, interval: str) -> None:
    """Redis round trips per request, counted by redis-server, with the commands each
    kind sends: never touched 0 (one EXPIRE when a refresh is due), a read 1, a write
    that doesn't read first 1, a read-modify-write 2 (the load, then the save). With
    interval 0 a refresh is due on every request and rides in the same round trips.
    Flask-Session, in the same run, makes 2 for every kind. One worker thread, and one
    request of each kind before the count: a thread's first plain command and its first
    batch each open a connection (see gunicorn_ext.state.redis), which takes round trips."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    kinds = {"untouched": "/nosession", "read": "/get", "write without a read": "/put/b",
             "read-modify-write": "/set/c"}
    n = 10
    trips: dict[str, dict[str, float]] = {}
    commands: dict[str, dict[str, int]] = {}
    for impl in ("ours", "flask_session"):
        extra = {"SESSION_REFRESH_INTERVAL": interval} if impl == "ours" else {}
        g = _start(gunicorn_factory, impl, redis_server.url, repo_root, workers=1, threads=1,
                   **extra)
        s = requests.Session()
        s.get(g.url("/put/a"), timeout=10).raise_for_status()  # the session exists
        for path in ("/nosession", "/get", "/set/w", "/put/w"):  # a field of their own
            s.get(g.url(path), params={"v": "warm-up"}, timeout=10).raise_for_status()
        for kind, path in kinds.items():
            r.config_resetstat()
            before = _reads(r)
            for i in range(n):  # a new value each time: each write has something to save
                s.get(g.url(path), params={"v": f"{kind} {i}"}, timeout=10).raise_for_status()
            got = _reads(r) - before - 1  # less the INFO that reads the count
            trips.setdefault(impl, {})[kind] = got / n
            if impl == "ours":
                commands[kind] = _redis_commands(r)
        data = s.get(g.url("/get"), timeout=10).json()
        data.pop("_permanent", None)  # Flask-Session stores it
        data.pop("w")
        assert data == {
            "a": "1", "b": f"write without a read {n - 1}", "c": f"read-modify-write {n - 1}"}
        g.stop()
        r.flushall()
    print(f"Redis round trips per request (interval {interval}s): {trips}; ours sent {commands}")
    refresh = 0 if interval == "3600" else 1
    assert trips["ours"] == {"untouched": refresh, "read": 1, "write without a read": 1,
                             "read-modify-write": 2}, trips
    assert all(v == 2 for v in trips["flask_session"].values()), trips
    if interval == "3600":
        assert commands == {
            "untouched": {},
            "read": {"hgetall": n},
            # its reply says it existed: the mark stored at creation was not new
            "write without a read": {"hset": n},
            # one plain HSET, checked by its reply; the first write adds the field
            # (all new: the reply can't tell) and has EXPIRE NX ride with it
            "read-modify-write": {"hgetall": n, "hset": n, "expire": 1},
        }, commands
    else:  # the refresh's EXPIRE rides with the load, or before the blind HSET
        assert commands == {
            "untouched": {"expire": n},
            "read": {"hgetall": n, "expire": n},
            "write without a read": {"hset": n, "expire": 2 * n},
            "read-modify-write": {"hgetall": n, "hset": n, "expire": n + 1},
        }, commands


def test_sliding_expiry_with_a_refresh_interval(gunicorn_factory: Any, redis_server: Any,
                                                repo_root: Path) -> None:
    """A 3 s lifetime, refreshed at most every 1 s: a session kept busy for more than
    twice its lifetime by requests that never touch it, then by writes that don't read
    it, then by reads, is still there with its data, and the store saw at most one TTL
    refresh per interval; left alone for its lifetime, it is gone. (The cookie's
    timestamp has 1 s resolution: a shorter interval refreshes more often, never less.)"""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    lifetime, interval, phase = 3.0, 1.0, 2.5
    g = _start(gunicorn_factory, "ours", redis_server.url, repo_root,
               SESSION_LIFETIME=str(int(lifetime)), SESSION_REFRESH_INTERVAL=str(interval))
    s = requests.Session()
    s.get(g.url("/put/a"), timeout=10).raise_for_status()
    (key,) = r.keys("session:*")
    for path in ("/nosession", "/put/b", "/get"):
        r.config_resetstat()
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < phase and sent < 400:
            s.get(g.url(path), timeout=10).raise_for_status()
            sent += 1
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        refreshes = _redis_commands(r).get("expire", 0)
        if path == "/put/b":  # a write's refresh: EXPIRE, and EXPIRE NX closing the pipeline
            refreshes /= 2
        assert 1 <= refreshes <= elapsed / interval + 2, (path, refreshes, sent, elapsed)
        assert sent > refreshes
        left = r.pttl(key)
        assert 0 < left <= lifetime * 1000
    assert s.get(g.url("/get"), timeout=10).json() == {"a": "1", "b": "1"}
    time.sleep(lifetime + 0.5)  # nothing for a lifetime: gone
    assert r.exists(key) == 0
    assert s.get(g.url("/get"), timeout=10).json() == {}
