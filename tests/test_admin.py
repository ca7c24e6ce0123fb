"""The admin endpoint (gunicorn_ext/admin.py): the primary answers for the instance itself.

Real Gunicorn with the example's cluster_conf.py throughout: the example app for the
readiness, status and metrics claims, a test-only app (tests/apps/admin_app.py) only
to hold every worker thread at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from harness import Gunicorn, free_port, free_port_pair, wait_for
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_ext.metrics import CONTENT_TYPE
from gunicorn_ext.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask_app"
APPS = Path(__file__).resolve().parent / "apps"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")
ADMIN_TIMEOUT = 2.0  # the client's patience with the admin endpoint (the app port gets as long)


def admin_env(tmp_path: Path, **extra: str) -> tuple[int, dict[str, str]]:
    port = free_port()
    env = {"ADMIN_BIND": f"127.0.0.1:{port}", "STATE_URL": f"sqlite:///{tmp_path}/state.db",
           "SECRET_KEY": "test-admin", **extra}
    return port, env


def get(port: int, path: str, timeout: float = ADMIN_TIMEOUT) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=timeout,
                        headers={"Connection": "close"})


def raw(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def cli(g: Gunicorn, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=g.env, capture_output=True, text=True, timeout=90,
                          stdin=subprocess.DEVNULL)


# -- the setting ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["127.0.0.1:9191", "127.1.2.3:1", "[::1]:9191", "localhost:65535"])
def test_admin_bind_accepts_loopback(value: str) -> None:
    assert Settings(admin_bind=value).admin_bind == value


@pytest.mark.parametrize(("value", "why"), [
    ("0.0.0.0:9191", "must be a loopback address"),
    ("10.1.2.3:9191", "must be a loopback address"),
    ("example.com:9191", "must be a loopback address"),
    ("127.0.0.1", "must be 'host:port'"),
    (":9191", "must be 'host:port'"),
    ("127.0.0.1:0", "port number from 1 to 65535"),
    ("127.0.0.1:70000", "port number from 1 to 65535"),
    ("127.0.0.1:http", "port number from 1 to 65535"),
    ("::1:9191", "IPv6 address in brackets"),
    (9191, "must be a string"),
    (None, "must be a string"),
])
def test_admin_bind_refuses_clearly(value: Any, why: str) -> None:
    with pytest.raises(SettingsError) as exc:
        Settings(admin_bind=value)
    assert "admin_bind" in str(exc.value) and why in str(exc.value)


def test_admin_allow_remote_is_explicit() -> None:
    assert Settings(admin_bind="0.0.0.0:9191", admin_allow_remote=True).admin_bind == "0.0.0.0:9191"
    with pytest.raises(SettingsError, match="admin_allow_remote must be True or False"):
        Settings(admin_bind="0.0.0.0:9191", admin_allow_remote="yes")  # type: ignore[arg-type]
    assert Settings().admin_bind == ""  # off by default


# -- with every worker thread blocked --------------------------------------------------


def test_answers_while_every_worker_thread_is_blocked(gunicorn_factory: Callable[..., Gunicorn],
                                                      tmp_path: Path) -> None:
    release = tmp_path / "release"
    base = free_port_pair()  # slot N also listens on base+N: two blockers to each worker
    port, env = admin_env(tmp_path, THREADS="2", ADMIN_APP_RELEASE=str(release),
                          WORKER_PORTS_BASE=str(base))
    g = gunicorn_factory("admin_app:app", config=EXAMPLE / "cluster_conf.py", cwd=APPS, workers=2,
                         env=env)
    wait_for(lambda: get(port, "/readyz").status_code == 200, 20, what="readyz 200")
    results: list[int] = []

    def block(slot: int) -> None:
        r = requests.get(f"http://127.0.0.1:{base + slot}/block", timeout=30)
        results.append(r.status_code)

    blockers = [threading.Thread(target=block, args=(i % 2,)) for i in range(4)]  # 2 x 2 threads
    for t in blockers:
        t.start()
    try:
        # Every thread is taken: the primary's own numbers say so (stats arrive every 1 s).
        wait_for(lambda: [w["inflight"] for w in get(port, "/status").json()["workers"]] == [2, 2],
                 15, what="2 requests in flight in each worker")
        with pytest.raises(requests.RequestException):
            requests.get(g.url("/healthz"), timeout=ADMIN_TIMEOUT)  # the app port can't answer
        latencies: dict[str, list[float]] = {}
        for _ in range(10):
            for path in ("/livez", "/readyz", "/status", "/metrics"):
                t0 = time.perf_counter()
                r = get(port, path)  # raises if it takes longer than ADMIN_TIMEOUT
                latencies.setdefault(path, []).append(time.perf_counter() - t0)
                assert r.status_code == 200, (path, r.status_code, r.text)
        text = get(port, "/metrics").text
        inflight = samples(text, "gunicorn_ext_requests_inflight")
        assert sum(inflight.values()) == 4 and {dict(k)["slot"] for k in inflight} == {"0", "1"}
        assert get(port, "/readyz").text.startswith("ready")  # busy is not unready
        print("admin latency with every worker thread blocked (ms): " + ", ".join(
            f"{p} p50 {statistics.median(v) * 1000:.1f} max {max(v) * 1000:.1f}"
            for p, v in latencies.items()))
    finally:
        release.touch()
        for t in blockers:
            t.join(timeout=30)
    assert results == [200] * 4


# -- the example: readiness, status, metrics -------------------------------------------


def test_example_readiness_status_and_metrics(gunicorn_factory: Callable[..., Gunicorn],
                                              tmp_path: Path) -> None:
    port, env = admin_env(tmp_path)
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         env=env, wait=False)
    seen: list[tuple[int, str]] = []

    def ready() -> bool:
        try:
            r = get(port, "/readyz", timeout=1.0)
        except requests.RequestException:
            return False
        seen.append((r.status_code, r.text))
        return r.status_code == 200

    wait_for(ready, 30, interval=0.01, what="readyz 200")
    # The workers import the app after the primary listens: not ready first, with the reason
    # (on a loaded machine the first answer may already be the ready one; the failed-rollout
    # test below checks a 503 deterministically).
    not_ready = [text for code, text in seen if code == 503]
    assert all(t.startswith("not ready\n- slot ") and "has no ready worker: " in t for t in not_ready)
    assert not not_ready or any("its worker is booting" in t for t in not_ready), not_ready
    assert seen[-1][1] == "ready: 2 slot(s) served\n"
    assert get(port, "/livez").text == f"ok: primary pid {g.master_pid}\n"
    g.wait_ready()

    # /status is the `gunicorn-ext status --json` document.
    r = get(port, "/status")
    assert r.headers["Content-Type"] == "application/json"
    doc = r.json()
    r2 = cli(g, "status", "--json")
    assert r2.returncode == 0, r2.stderr
    cli_doc = json.loads(r2.stdout)
    assert set(doc) == set(cli_doc)
    assert doc["primary_pid"] == cli_doc["primary_pid"] == g.master_pid
    assert {w["pid"] for w in doc["workers"]} == {w["pid"] for w in cli_doc["workers"]} \
        == set(g.worker_pids())
    assert doc["workers_target"] == 2 and doc["rollout"]["state"] == "idle"

    # /metrics: the primary's rendering, per slot, counting what the app port served.
    before = sum(samples(get(port, "/metrics").text, "gunicorn_ext_requests_total").values())
    for _ in range(30):
        assert requests.get(g.url("/whoami"), timeout=10).status_code == 200

    def counted() -> dict[Any, float] | None:
        got = samples(get(port, "/metrics").text, "gunicorn_ext_requests_total")
        return got if sum(got.values()) - before >= 30 else None

    got = wait_for(counted, 10, what="30 requests counted")
    assert {dict(k)["slot"] for k in got} == {"0", "1"}
    r = get(port, "/metrics")
    assert r.headers["Content-Type"] == CONTENT_TYPE and CONTENT_TYPE.startswith("text/plain;")
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"gunicorn_ext_requests", "gunicorn_ext_request_duration_seconds",
            "gunicorn_ext_worker_rss_bytes", "gunicorn_ext_workers"} <= families
    # The example keeps /metrics on the app port (served through a worker): same families.
    app_families = {f.name for f in text_string_to_metric_families(g.get("/metrics").text)}
    assert families == app_families

    # The listener is the primary's alone: every worker closed its inherited copy.
    def listeners(pid: int) -> list[Any]:
        return [c for c in psutil.Process(pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port]

    assert len(listeners(g.master_pid)) == 1
    for pid in g.worker_pids():
        assert listeners(pid) == [], f"worker {pid} holds the admin listener"


def test_failed_rollout_makes_readyz_503_while_old_workers_serve(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE, site, ignore=shutil.ignore_patterns("__pycache__", "*.db*"))
    port, env = admin_env(tmp_path)
    g = gunicorn_factory("app:app", config=site / "cluster_conf.py", cwd=site, workers=2, env=env)
    wait_for(lambda: get(port, "/readyz").status_code == 200, 20, what="readyz 200")
    good = (site / "app.py").read_text()
    (site / "app.py").write_text(good + '\nraise ImportError("this deploy is broken on purpose")\n')
    r = cli(g, "reload", "--rolling")
    assert r.returncode == 1, (r.stdout, r.stderr)
    r = get(port, "/readyz")
    assert r.status_code == 503
    assert "- the last rolling reload failed: rollout stopped after 0 of 2" in r.text
    assert "ImportError" in r.text or "exit code" in r.text
    assert g.get("/healthz").status_code == 200  # the old workers keep serving
    assert "admin endpoint answered" not in g.log_text()  # a 503 probe answer is not logged

    (site / "app.py").write_text(good)
    r = cli(g, "reload", "--rolling")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert get(port, "/readyz").status_code == 200


# -- the seams: bad input, slow clients, floods, forks ----------------------------------


def test_bad_input_is_a_4xx_with_one_log_line_never_a_5xx(gunicorn_factory: Callable[..., Gunicorn],
                                                           tmp_path: Path) -> None:
    port, env = admin_env(tmp_path)
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=1,
                         env=env)
    cases = [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /metrics/../etc/passwd HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
        (b"DELETE /status HTTP/1.1\r\n\r\n", 405),
        (b"BREW /livez HTTP/1.1\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"\x00\xff\xfe\x01\r\n\r\n", 400),
        (b"GET /livez HTTP/9.9\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 431),
    ]
    for payload, want in cases:
        answer = raw(port, payload)
        assert answer.startswith(f"HTTP/1.1 {want} ".encode()), (payload[:40], answer[:200])
    log = g.wait_log("answered 431")
    lines = [ln for ln in log.splitlines() if "admin endpoint answered" in ln]
    assert len(lines) == len(cases), "\n".join(lines)
    assert all("[WARNING]" in ln for ln in lines)
    assert "Traceback" not in log
    r = requests.head(f"http://127.0.0.1:{port}/metrics", timeout=ADMIN_TIMEOUT)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["Content-Length"]) > 100
    assert get(port, "/livez?verbose=1").status_code == 200  # a query string is ignored

    # Silent and half-sent clients, and a flood of connections, hold nobody up.
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    silent[0].sendall(b"GET /livez HTTP/1.1\r\nHost:")
    try:
        assert get(port, "/livez").status_code == 200
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
        try:
            closed = 0
            for s in flood[60:]:  # past MAX_CLIENTS (64): closed by the server at once
                s.settimeout(5)
                closed += s.recv(1) == b""
            assert closed == 20
        finally:
            for s in flood:
                s.close()
        def live() -> bool:
            try:
                return get(port, "/livez").status_code == 200
            except requests.RequestException:  # still at its cap, closing the flood
                return False

        wait_for(live, 10, what="livez after the flood")
        for _ in range(50):  # clients that ask, then reset the connection without reading
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert get(port, "/metrics").status_code == 200
        silent[1].settimeout(10)
        assert silent[1].recv(100).startswith(b"HTTP/1.1 408 ")  # told, then closed
    finally:
        for s in silent:
            s.close()
    assert g.get("/healthz").status_code == 200 and g.alive()
    assert "admin endpoint failed" not in g.log_text()


def test_forks_while_the_endpoint_is_busy_do_not_deadlock(gunicorn_factory: Callable[..., Gunicorn],
                                                          tmp_path: Path) -> None:
    port, env = admin_env(tmp_path)
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         env=env)
    stop = threading.Event()
    codes: list[int] = []
    errors: list[str] = []

    def hammer(path: str) -> None:
        with requests.Session() as s:
            for _ in range(5000):
                if stop.is_set():
                    return
                try:
                    codes.append(s.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code)
                except requests.RequestException as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(p,)) for p in ("/metrics", "/status", "/readyz")]
    for t in threads:
        t.start()
    try:
        for _ in range(5):  # every respawn is a fork of the primary while its thread serves
            old = set(g.worker_pids())
            os.kill(sorted(old)[0], signal.SIGKILL)
            wait_for(lambda old=old: len(set(g.worker_pids()) - old) == 1 and
                     len(g.worker_pids()) == 2, 20, what="the replacement worker")
            time.sleep(0.3)
        wait_for(lambda: get(port, "/readyz").status_code == 200, 20, what="ready again")
        # HUP: Gunicorn re-reads the config and forks a new generation; the endpoint stays.
        old = set(g.worker_pids())
        g.signal(signal.SIGHUP)
        wait_for(lambda: not old & set(g.worker_pids()) and len(g.worker_pids()) == 2
                 and get(port, "/readyz").status_code == 200, 30, what="a new generation, ready")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    assert not errors, errors[:3]
    assert len(codes) > 50 and set(codes) <= {200, 503}
    assert "did not pause before fork" not in g.log_text()
    assert "admin endpoint failed" not in g.log_text()
    assert g.get("/whoami").status_code == 200


def test_unusable_admin_bind_stops_the_start_with_one_line(gunicorn_factory: Callable[..., Gunicorn],
                                                           tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        for bind, needle in [(f"127.0.0.1:{busy}", f"cannot listen on admin_bind 127.0.0.1:{busy}"),
                             (f"0.0.0.0:{busy}", "admin_bind must be a loopback address")]:
            _, env = admin_env(tmp_path)
            env["ADMIN_BIND"] = bind
            g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE,
                                 env=env, wait=False, name=f"bad-{len(needle)}")
            assert g.proc is not None
            assert g.proc.wait(timeout=30) != 0
            log = g.log_text()
            assert log.count(needle) == 1, log
            assert "Booting worker" not in log
    finally:
        taken.close()


class ScriptGunicorn(Gunicorn):
    """Started by the ``gunicorn`` script, so that USR2 re-executes something that runs."""

    @property
    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / "gunicorn"), *super().command[3:]]


def test_usr2_new_master_takes_the_address_over(tmp_path: Path) -> None:
    port, env = admin_env(tmp_path)
    g = ScriptGunicorn("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=1,
                       env=env, log_dir=tmp_path)
    try:
        g.start().wait_ready()
        old = g.master_pid
        assert get(port, "/livez").text == f"ok: primary pid {old}\n"
        g.signal(signal.SIGUSR2)
        g.wait_log(f"is still held, by the old master (pid {old})", timeout=20)
        assert get(port, "/livez").text == f"ok: primary pid {old}\n"  # the old one still serves
        os.kill(old, signal.SIGTERM)

        def new_primary() -> bool:
            try:
                text = get(port, "/livez").text
            except requests.RequestException:
                return False
            return text.startswith("ok: primary pid ") and text != f"ok: primary pid {old}\n"

        wait_for(new_primary, 20, what="the new master serving the admin endpoint")
        assert "(taken over)" in g.log_text()
        wait_for(lambda: get(port, "/readyz").status_code == 200, 20, what="the new master ready")
    finally:
        g.stop()


def test_readyz_says_shutting_down_while_workers_drain(gunicorn_factory: Callable[..., Gunicorn],
                                                        tmp_path: Path) -> None:
    release = tmp_path / "release"
    port, env = admin_env(tmp_path, ADMIN_APP_RELEASE=str(release), GRACEFUL_TIMEOUT="20")
    g = gunicorn_factory("admin_app:app", config=EXAMPLE / "cluster_conf.py", cwd=APPS, workers=1,
                         env=env)
    wait_for(lambda: get(port, "/readyz").status_code == 200, 20, what="readyz 200")
    out: list[int] = []
    blocker = threading.Thread(target=lambda: out.append(
        requests.get(g.url("/block"), timeout=30).status_code))
    blocker.start()
    try:
        wait_for(lambda: get(port, "/status").json()["totals"]["inflight"] == 1, 15,
                 what="the request in flight")
        g.signal(signal.SIGTERM)  # Gunicorn closes its listeners, the worker drains
        text = wait_for(lambda: (lambda r: r.text if r.status_code == 503 else None)(
            get(port, "/readyz")), 10, what="readyz 503 while draining")
        assert "the primary is shutting down" in text
        assert get(port, "/livez").status_code == 200  # alive, just not taking traffic
    finally:
        release.touch()
        blocker.join(timeout=30)
    assert out == [200]  # the in-flight request finished
    assert g.proc is not None and g.proc.wait(timeout=30) == 0
