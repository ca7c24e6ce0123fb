"""Graceful stop (SIGTERM) with real Gunicorn, real clients and real nginx: what is
already queued in the listen backlog is served, new connections are refused, and
behind nginx with two instances of the example, stopping one fails no request."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, find_binary, free_port, tail, wait_for

APPS = Path(__file__).parent / "apps"
CONF = APPS / "life_conf.py"
EXAMPLE = Path(__file__).parent.parent / "examples/flask_app"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")


_GUNICORN_MAJOR = int(__import__("gunicorn").__version__.split(".")[0])


class MixedLoad:
    """GET and POST requests from a few threads until stopped (bounded in count and time).

    Every third request is a POST of a JSON message to *post* (None: GETs only).
    Each thread uses its own keep-alive session; a request counts as failed on any
    connection error, timeout or status other than the one expected for it.
    """

    def __init__(self, base: str, host: str | None = None, threads: int = 4,
                 limit: int = 20000, seconds: float = 40,
                 get: str = "/whoami", post: str | None = "/broadcast") -> None:
        self.base, self.limit, self.seconds = base, limit, seconds
        self.headers = {"Host": host} if host else {}
        if _GUNICORN_MAJOR < 27:
            # Gunicorn before 27 drops a stopping gthread worker's idle kept-alive
            # connections (27 answers a request arriving on one with "Connection: close"),
            # so a client reusing one at that instant is reset: there, every request has
            # its own connection (as the rolling-reload load in test_lifecycle.py does).
            self.headers["Connection"] = "close"
        self.get_path, self.post_path = get, post
        self.ok = 0
        self.posts = 0
        self.pids: set[int] = set()
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        end = time.monotonic() + self.seconds
        s = requests.Session()
        n = 0
        while not self._stop.is_set() and time.monotonic() < end and self.ok < self.limit:
            n += 1
            post = self.post_path is not None and (n + i) % 3 == 0
            try:
                if post:
                    r = s.post(f"{self.base}{self.post_path}", json={"message": f"m{i}-{n}"},
                               headers=self.headers, timeout=15)
                    good = r.status_code == 202
                else:
                    r = s.get(self.base + self.get_path, headers=self.headers, timeout=15)
                    good = r.status_code == 200
                if not good:
                    raise RuntimeError(f"{'POST' if post else 'GET'} -> {r.status_code}: {r.text[:200]}")
                with self._lock:
                    self.ok += 1
                    self.posts += post
                    if not post:
                        self.pids.add(r.json()["pid"])
            except (requests.RequestException, RuntimeError) as exc:
                with self._lock:
                    self.failed.append(repr(exc)[:300])

    def __enter__(self) -> MixedLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _slow_burst(g: Gunicorn, n: int, seconds: float) -> tuple[list[Any], list[threading.Thread]]:
    """*n* concurrent one-shot requests that each take *seconds* in the app."""
    results: list[Any] = []

    def one() -> None:
        try:
            r = requests.get(g.url(f"/slow?s={seconds}"), headers={"Connection": "close"}, timeout=20)
            results.append(r.status_code)
        except requests.RequestException as exc:
            results.append(repr(exc)[:200])

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return results, threads


def _refused_now(g: Gunicorn) -> bool:
    """A new connection is refused (not left waiting): the instance stopped listening."""
    try:
        requests.get(g.url("/"), headers={"Connection": "close"}, timeout=3)
    except requests.RequestException as exc:
        return "Connection refused" in repr(exc)  # not reset, not timed out
    return False


@pytest.mark.parametrize("worker_class,workers,burst", [("gthread", 1, 12), ("sync", 2, 6)])
def test_sigterm_serves_what_is_queued_in_the_backlog(gunicorn_factory: Any, worker_class: str,
                                                      workers: int, burst: int) -> None:
    """Every worker busy, more clients queued in the kernel's backlog (the primary only
    accepts for a worker with room): SIGTERM serves them all, and refuses newcomers."""
    g = gunicorn_factory("life_app:app", config=CONF, cwd=APPS, workers=workers,
                         env={"WORKER_CLASS": worker_class})
    wait_for(lambda: g.log_text().count("Booting worker") >= workers and len(g.worker_pids()) == workers,
             20, what="workers up")
    time.sleep(0.5)  # every worker has reported its free threads to the dispatcher
    results, threads = _slow_burst(g, burst, 1.0)
    time.sleep(0.4)  # all connected: `workers x threads` in the app, the rest queued
    g.signal(15)
    wait_for(lambda: "Handling signal: term" in g.log_text(), 10, what="the TERM")
    time.sleep(0.3)
    assert _refused_now(g), "a new client must be refused once the instance stops"
    for t in threads:
        t.join(30)
    assert results == [200] * burst
    assert g.proc is not None and g.proc.wait(20) == 0
    m = re.search(r"graceful stop: not listening any more; the (\d+) connection", g.log_text())
    assert m is not None and int(m.group(1)) >= 1, g.log_text_tail()


def test_sigterm_without_even_spread_refuses_new_clients_instead_of_queueing(
        gunicorn_factory: Any) -> None:
    """even_spread=False: the workers accept; Gunicorn alone would leave newcomers
    waiting in the backlog until the last worker exits (then reset them)."""
    g = gunicorn_factory("life_app:app", config=CONF, cwd=APPS, workers=1,
                         env={"EVEN_SPREAD": "0"})
    results, threads = _slow_burst(g, 6, 1.5)
    time.sleep(0.4)
    g.signal(15)
    time.sleep(0.3)
    assert _refused_now(g)
    for t in threads:
        t.join(30)
    assert results == [200] * 6
    assert g.proc is not None and g.proc.wait(20) == 0


@pytest.mark.parametrize("worker_class,app", [("gevent", "life_app:app"),
                                              ("asgi", "life_asgi_app:app")])
def test_sigterm_refuses_new_clients_only_once_the_workers_stopped_accepting(
        gunicorn_factory: Any, worker_class: str, app: str) -> None:
    """gevent and the asyncio workers stop accepting up to a second after their TERM; the
    listeners are shut down only then, so no worker's accept() fails (EINVAL) on one, and
    the requests in flight are served."""
    g = gunicorn_factory(app, config=CONF, cwd=APPS, workers=2, env={"WORKER_CLASS": worker_class})
    wait_for(lambda: g.log_text().count("Booting worker") >= 2 and len(g.worker_pids()) == 2,
             20, what="workers up")
    time.sleep(1.0)  # both booted through (a TERM while booting is Gunicorn's business)
    results, threads = _slow_burst(g, 4, 1.5)
    time.sleep(0.4)
    g.signal(15)
    wait_for(lambda: _refused_now(g), 15, interval=0.1, what="new clients refused")
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    assert g.proc is not None and g.proc.wait(20) == 0
    text = g.log_text()
    assert "Errno 22" not in text and "Invalid argument" not in text, g.log_text_tail()
    assert "Traceback" not in text, g.log_text_tail()


def _nginx_for(backends: list[Gunicorn], port: int) -> str:
    args = [CLI, "nginx", "render", "--listen", str(port), "--server-name", "app.test"]
    for g in backends:
        args += ["--backend", g.bind]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
    return re.sub(r"listen (\d+)", r"listen 127.0.0.1:\1", r.stdout)


def test_stopping_one_of_two_instances_behind_nginx_fails_no_request(
        gunicorn_factory: Any, nginx_site: Any, tmp_path: Path) -> None:
    if find_binary("nginx") is None:
        pytest.fail("nginx is not installed; run `make system-deps`")
    env = {"STATE_URL": f"sqlite:///{tmp_path / 'state.db'}", "THREADS": "8"}
    a, b = (gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE,
                             workers=2, env=dict(env, INSTANCE=name), name=f"gunicorn-{name}")
            for name in ("a", "b"))
    port = free_port()
    with nginx_site(_nginx_for([a, b], port), port) as prefix:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(base + "/cluster", headers={"Host": "app.test"},
                                      timeout=5).status_code == 200, 20, what="the cluster view")
        with MixedLoad(base, host="app.test", threads=6) as load:
            time.sleep(1.5)
            before = load.ok
            a.signal(15)
            assert a.proc is not None and a.proc.wait(30) == 0
            time.sleep(1.0)
        # nginx's reason for a failure (reset, refused, closed before the response) says
        # which seam lost it; Gunicorn's log says what the stopping instance did meanwhile
        assert load.failed == [], (load.failed[:5], tail(prefix / "error.log"),
                                   a.log_text_tail())
        assert before > 20 and load.ok > before and load.posts > 10
    assert "graceful stop: not listening any more" in a.log_text()
    assert b.alive()
