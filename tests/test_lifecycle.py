"""Worker lifecycle with real Gunicorn: backoff, breaker, recycling, rolling reload,
hung-worker stacks, status, scale and metrics across worker replacement."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, find_binary, free_port, free_port_pair, running_nginx, wait_for
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_ext import nginx as nginx_conf
from gunicorn_ext.cli import format_status

APPS = Path(__file__).parent / "apps"
CONF = APPS / "life_conf.py"
EXAMPLE = Path(__file__).parent.parent / "examples/flask_app"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")


def start(factory: Any, workers: int = 2, wait: bool = True, **env: str) -> Gunicorn:
    return factory("life_app:app", config=CONF, cwd=APPS, workers=workers, env=env,  # type: ignore[no-any-return]
                   wait=wait)


def get(g: Gunicorn, path: str = "/", timeout: float = 30) -> dict[str, Any]:
    r = requests.get(g.url(path), headers={"Connection": "close"}, timeout=timeout)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def cli(g: Gunicorn, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=g.env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def status(g: Gunicorn) -> dict[str, Any]:
    r = cli(g, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def ready_slots(g: Gunicorn) -> dict[int, int]:
    return {w["slot"]: w["pid"] for w in status(g)["workers"] if w["state"] == "ready"}


def wait_ready_slots(g: Gunicorn, n: int, exclude: set[int] = frozenset(), timeout: float = 30) -> dict[int, int]:  # type: ignore[assignment]
    def ok() -> dict[int, int] | None:
        s = ready_slots(g)
        return s if sorted(s) == list(range(n)) and not exclude & set(s.values()) else None

    return wait_for(ok, timeout, interval=0.1, what=f"{n} ready slots")  # type: ignore[no-any-return]


# -- crash loops -----------------------------------------------------------------------


def test_crash_loop_backs_off_then_opens_the_breaker(gunicorn_factory: Any) -> None:
    # Each worker crashes on its first request, soon after it is ready: unstable exits.
    g = start(gunicorn_factory, 1, APP_MODE="crash_every_request", RESTART_DELAY="0.2",
              BREAKER_FAILURES="4", MIN_UPTIME="10")
    wait_ready_slots(g, 1)
    deadline = time.monotonic() + 30
    while "restart breaker open" not in g.log_text() and time.monotonic() < deadline:
        try:
            requests.get(g.url("/crash"), timeout=2)
        except requests.RequestException:
            pass
        time.sleep(0.05)
    log = g.log_text()
    assert "restart breaker open: slot 0 crashed 4 times in 60s, last cause: exit code 1" in log
    assert "respawning in 0.00s" in log and "respawning in 0.20s" in log and "respawning in 0.30s" in log
    assert log.count("restart breaker open") == 1
    time.sleep(1.0)
    st = status(g)
    assert [w["state"] for w in st["workers"]] == ["stopped"]
    assert st["workers"][0]["last_exit"] == "exit code 1"
    assert g.alive()  # "hold": the primary stays up, no fork storm
    booted = log.count("Booting worker")
    time.sleep(1.5)
    assert g.log_text().count("Booting worker") == booted
    # An operator's scale (or rolling reload) closes the breaker and tries again.
    assert cli(g, "scale", "1").returncode == 0
    wait_for(lambda: g.log_text().count("Booting worker") > booted, 10)


def test_import_error_halts_like_gunicorn_by_default(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, wait=False, APP_MODE="import_error")
    wait_for(lambda: not g.alive(), 30, what="the master to halt")
    assert "Reason: Worker failed to boot." in g.log_text()


def test_import_error_goes_through_the_breaker_with_its_traceback(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, wait=False, APP_MODE="import_error", HALT_ON_BOOT_ERROR="0",
              BREAKER_FAILURES="3", RESTART_DELAY="0.05")
    g.wait_log("restart breaker open", timeout=30)
    log = g.log_text()
    assert "slot 0 crashed 3 times" in log
    assert "Last traceback from the worker:" in log
    assert "this deploy is broken on purpose (life_app)" in log
    assert g.alive()


def test_breaker_exit_action_stops_the_primary(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, wait=False, APP_MODE="import_error", HALT_ON_BOOT_ERROR="0",
              BREAKER_FAILURES="2", RESTART_DELAY="0.05", BREAKER_ACTION="exit")
    wait_for(lambda: not g.alive(), 30, what="the master to exit")
    assert g.stop() == 1
    assert "restart breaker open" in g.log_text()


def refused(port: int) -> bool:
    """True when a connect to the port is refused (not accepted, not left hanging)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def slot_of(port: int) -> int | None:
    try:
        r = requests.get(f"http://127.0.0.1:{port}/", headers={"Connection": "close"}, timeout=10)
        return int(r.json()["slot"])
    except (requests.RequestException, ValueError, KeyError):
        return None


def test_served_then_sigkilled_workers_never_trip_the_breaker(gunicorn_factory: Any) -> None:
    base = free_port_pair()
    g = start(gunicorn_factory, 2, BREAKER_FAILURES="4", WORKER_PORTS_BASE=str(base))
    wait_ready_slots(g, 2)
    kills = 0
    deadline = time.monotonic() + 20
    while kills < 16 and time.monotonic() < deadline:
        try:  # the worker that answers has served: then it is SIGKILLed
            pid = get(g, "/", timeout=5)["pid"]
        except requests.RequestException:
            time.sleep(0.05)  # both slots in backoff: the instance refuses, try again
            continue
        os.kill(pid, signal.SIGKILL)
        kills += 1
        time.sleep(0.1)
    assert kills == 16  # 8 per slot on average: twice what would open a breaker counting kills
    wait_for(lambda: g.log_text().count("not counted by the breaker") == kills, 10,
             what="every kill logged as not counted")
    log = g.log_text()
    assert "restart breaker open" not in log
    # Kills don't make the backoff grow either: each one respawns at once.
    lines = [line for line in log.splitlines() if "not counted by the breaker" in line]
    assert all("killed by SIGKILL; respawning in 0.00s" in line for line in lines), lines
    after = wait_ready_slots(g, 2)
    assert all(w["breaker"] == "closed" for w in status(g)["workers"])
    # Every slot serves, on the shared port and on its own per-worker port.
    assert {slot_of(base + slot) for slot in (0, 1)} == {0, 1}
    assert get(g, "/")["pid"] in after.values()


def test_example_app_rides_out_a_kill_storm_without_the_breaker(gunicorn_factory: Any) -> None:
    """The example with its defaults: 11 SIGKILLs of a served worker in well under the 60 s
    window (the breaker opens at 10 unstable exits) never trip it, and the slot serves on."""
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=1)
    kills = 0
    deadline = time.monotonic() + 25
    while kills < 11 and time.monotonic() < deadline:
        try:
            who = get(g, "/whoami", timeout=10)
        except requests.RequestException:
            time.sleep(0.05)
            continue
        os.kill(who["pid"], signal.SIGKILL)
        kills += 1
    assert kills == 11

    def serving() -> dict[str, Any] | None:
        try:  # a connection handed to the worker just killed is lost with it (README)
            return get(g, "/whoami", timeout=10)
        except requests.RequestException:
            return None

    who = wait_for(serving, 20, what="the slot serving again")
    assert who["slot"] == 0
    wait_for(lambda: g.log_text().count("crashed after") == 11, 10, what="11 exits logged")
    log = g.log_text()
    assert "restart breaker open" not in log
    crashes = [line for line in log.splitlines() if "crashed after" in line]
    assert all("not counted by the breaker" in c for c in crashes), crashes
    text = requests.get(g.url("/metrics"), timeout=10).text
    gauges = {s.labels["slot"]: s.value for fam in text_string_to_metric_families(text)
              if fam.name == "gunicorn_ext_worker_breaker_open" for s in fam.samples}
    assert gauges == {"0": 0.0}


def test_unix_socket_refuses_while_held_and_is_whole_at_shutdown(gunicorn_factory: Any,
                                                                  tmp_path: Path) -> None:
    version = tmp_path / "VERSION"
    version.write_text("broken")
    path = tmp_path / "app.sock"
    g = start(gunicorn_factory, 1, wait=False, BIND=f"unix:{path}", APP_VERSION_FILE=str(version),
              HALT_ON_BOOT_ERROR="0", BREAKER_FAILURES="2", RESTART_DELAY="0.05",
              BREAKER_COOLDOWN="2", BREAKER_MAX_COOLDOWN="2", MIN_UPTIME="0.3")
    g.wait_log("restart breaker open:", timeout=30)
    wait_for(lambda: status(g)["listening"] is False, 10, what="listeners stopped")
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)), \
            socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(path))
    version.write_text("1")
    wait_ready_slots(g, 1)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert c.recv(12) == b"HTTP/1.0 200"
    assert g.stop() == 0
    assert not path.exists()  # Gunicorn unlinked the path it had bound
    assert not list(tmp_path.glob("*paused*"))
    assert "Traceback" not in g.log_text().split("Handling signal: term")[-1]


@pytest.mark.parametrize("scope", ["slot", "instance"])
def test_boot_failure_trips_the_breaker_refuses_and_recovers_by_itself(
        gunicorn_factory: Any, tmp_path: Path, scope: str) -> None:
    version = tmp_path / "VERSION"
    version.write_text("broken")  # life_app raises at import
    base = free_port_pair()
    g = start(gunicorn_factory, 2, wait=False, APP_VERSION_FILE=str(version), HALT_ON_BOOT_ERROR="0",
              BREAKER_FAILURES="3", BREAKER_SCOPE=scope, RESTART_DELAY="0.05",
              BREAKER_COOLDOWN="3", BREAKER_MAX_COOLDOWN="3", MIN_UPTIME="0.5",
              WORKER_PORTS_BASE=str(base))
    trips = 2 if scope == "slot" else 1
    wait_for(lambda: g.log_text().count("restart breaker open:") >= trips, 30, what="breaker open")
    log = g.log_text()
    assert "Not respawning" in log and "then trying one worker" in log
    assert log.count("Booting worker") <= 3 * 2  # within the breaker's bounds: no fork storm
    assert g.alive()
    # No worker is running: the instance refuses connections instead of queueing them.
    st = wait_for(lambda: (lambda st: st if st["listening"] is False else None)(status(g)), 10,
                  what="listeners stopped")
    assert {w["state"] for w in st["workers"]} == {"stopped"}
    assert {w["breaker"] for w in st["workers"]} == {"open"}
    assert refused(g.port) and refused(base) and refused(base + 1)
    with pytest.raises(requests.ConnectionError):
        requests.get(g.url("/"), timeout=5)
    text = format_status(st)
    assert "not listening" in text and "stopped (breaker open, retry in" in text
    # The cause is fixed: the half-open worker stays up, the breaker closes, every slot serves.
    version.write_text("1")
    wait_ready_slots(g, 2, timeout=30)
    wait_for(lambda: g.log_text().count("restart breaker closed:") >= trips, 10, what="closed")
    log = g.log_text()
    assert "restart breaker half-open after a 3s cool-down: trying one worker in slot 0" in log
    assert "restart breaker closed: the worker in slot 0" in log
    st = status(g)
    assert st["listening"] is True and {w["breaker"] for w in st["workers"]} == {"closed"}
    assert {slot_of(base + slot) for slot in (0, 1)} == {0, 1}
    assert get(g, "/")["version"] == "1"


def test_nginx_fails_over_at_once_from_an_instance_with_no_worker(gunicorn_factory: Any,
                                                                  tmp_path: Path) -> None:
    """Real nginx (the rendered template) in front of a healthy instance and one whose
    breaker holds every slot: no client waits on the held one, every request is served."""
    if find_binary("nginx") is None:
        pytest.fail("nginx is not installed; run `make system-deps`")
    good = start(gunicorn_factory, 2)
    held = start(gunicorn_factory, 1, wait=False, APP_MODE="import_error", HALT_ON_BOOT_ERROR="0",
                 BREAKER_FAILURES="2", RESTART_DELAY="0.05")
    held.wait_log("restart breaker open:", timeout=30)
    wait_for(lambda: status(held)["listening"] is False, 10, what="the held instance refusing")
    port = free_port()
    site = tmp_path / "nginx" / "site.conf"
    site.parent.mkdir()
    text = nginx_conf.render([f"127.0.0.1:{held.port}", f"127.0.0.1:{good.port}"], port, "app.test")
    site.write_text(re.sub(r"listen (\d+)", r"listen 127.0.0.1:\1", text))
    conf = site.parent / "nginx.conf"
    conf.write_text(nginx_conf.wrapper_conf([str(site)], str(site.parent),
                                            user="root" if os.geteuid() == 0 else None))
    pids = set(wait_ready_slots(good, 2).values())
    with running_nginx(conf, port) as prefix:
        for _ in range(20):  # round robin sends some to the held instance first
            r = requests.get(f"http://127.0.0.1:{port}/", headers={"Host": "app.test"}, timeout=5)
            assert r.status_code == 200 and r.json()["pid"] in pids
        errors = (prefix / "error.log").read_text()
    assert "(111: Connection refused) while connecting to upstream" in errors
    assert f"127.0.0.1:{held.port}" in errors


def test_a_failed_half_open_try_doubles_the_cool_down(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, wait=False, APP_MODE="import_error", HALT_ON_BOOT_ERROR="0",
              BREAKER_FAILURES="2", RESTART_DELAY="0.05", BREAKER_COOLDOWN="0.5",
              BREAKER_MAX_COOLDOWN="2")
    wait_for(lambda: g.log_text().count("next try in 2s") >= 2, 30, what="two tries at the cap")
    log = g.log_text()
    assert log.count("restart breaker open:") == 1
    assert "Not respawning slot 0 for 0.5s, then trying one worker" in log
    opened = [line.split("next try in ")[1].split("s")[0] for line in log.splitlines()
              if "restart breaker open again" in line]
    assert opened[:4] == ["1", "2", "2", "2"][: len(opened[:4])] and len(opened) >= 3
    halves = [line.split("after a ")[1].split("s ")[0] for line in log.splitlines()
              if "restart breaker half-open" in line]
    assert halves[:3] == ["0.5", "1", "2"]
    assert "this deploy is broken on purpose" in log
    assert "restart breaker closed" not in log
    assert g.alive()


# -- memory and lifetime --------------------------------------------------------------


def test_soft_memory_limit_recycles_after_the_request(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, MEMORY_SOFT="150M")
    first = wait_ready_slots(g, 1)
    r = get(g, "/leak?mb=200")  # the leaking request itself completes
    assert r["pid"] == first[0]
    g.wait_log("recycling: RSS")
    again = wait_ready_slots(g, 1, exclude={first[0]})
    assert get(g, "/")["pid"] == again[0]
    st = status(g)["workers"][0]
    assert st["last_exit"].startswith("recycled: RSS") and st["restarts"] == 1


def test_soft_limit_lets_other_in_flight_requests_finish(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, MEMORY_SOFT="150M")
    wait_ready_slots(g, 1)
    slow: dict[str, Any] = {}
    t = threading.Thread(target=lambda: slow.update(get(g, "/slow?s=2")))
    t.start()
    time.sleep(0.3)
    get(g, "/leak?mb=200")
    t.join(10)
    assert slow.get("version") == "1"  # finished, not cut off


def test_hard_memory_limit_is_enforced_by_the_primary(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, MEMORY_HARD="150M")
    first = wait_ready_slots(g, 1)
    get(g, "/leak?mb=200")
    g.wait_log("over memory_hard_limit")
    wait_ready_slots(g, 1, exclude={first[0]})
    assert "stopped by the primary" in status(g)["workers"][0]["last_exit"]


def test_max_lifetime_with_jitter_recycles(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2, MAX_LIFETIME="1.5", MAX_LIFETIME_JITTER="1")
    first = wait_ready_slots(g, 2)
    wait_ready_slots(g, 2, exclude=set(first.values()))
    assert "reached max_lifetime" in g.log_text()


# -- hung workers -----------------------------------------------------------------------


def test_hung_worker_stacks_are_logged_before_the_kill(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 1, WORKER_CLASS="sync", TIMEOUT="2")
    first = wait_ready_slots(g, 1)
    try:  # the hung request is cut off: an error response or a dropped connection
        r = requests.get(g.url("/hang?s=60"), timeout=15)
        assert r.status_code >= 500
    except requests.RequestException:
        pass
    g.wait_log("stacks of all its threads")
    log = g.log_text()
    assert "in hang_here" in log and "time.sleep(seconds)" in log
    assert "gunicorn-ext-reporter" in log  # every thread, not just the main one
    again = wait_ready_slots(g, 1, exclude={first[0]})
    assert again[0] != first[0]
    assert "timed out" in status(g)["workers"][0]["last_exit"]


# -- rolling reload -----------------------------------------------------------------------


_GUNICORN_MAJOR = int(__import__("gunicorn").__version__.split(".")[0])


class Load:
    """Requests from two threads until stopped (bounded in count and time)."""

    def __init__(self, g: Gunicorn, limit: int = 20000, seconds: float = 60) -> None:
        self.g, self.limit, self.seconds = g, limit, seconds
        self.ok = 0
        self.failed: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        s = requests.Session()
        # Gunicorn before 27 drops a stopping gthread worker's idle kept-alive connections
        # (27 answers a request arriving on one with "Connection: close"), so a client
        # reusing one at that instant is reset: there, every request has its own connection.
        headers = {} if _GUNICORN_MAJOR >= 27 else {"Connection": "close"}
        while not self._stop.is_set() and time.monotonic() < end and self.ok < self.limit:
            try:
                r = s.get(self.g.url("/"), timeout=10, headers=headers)
                r.raise_for_status()
                self.versions.add(r.json()["version"])
                self.ok += 1
            except requests.RequestException as exc:
                self.failed.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)


@pytest.mark.parametrize("batch", ["1", "2"])
def test_rolling_reload_under_load_fails_no_request(gunicorn_factory: Any, tmp_path: Path,
                                                    batch: str) -> None:
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = start(gunicorn_factory, 3, APP_VERSION_FILE=str(version))
    before = wait_ready_slots(g, 3)
    with Load(g) as load:
        time.sleep(0.5)
        version.write_text("2")
        r = cli(g, "reload", "--rolling", "--batch", batch)
        time.sleep(0.5)
    assert r.returncode == 0, r.stdout + r.stderr
    assert load.failed == [] and load.ok > 50
    assert load.versions == {"1", "2"}
    after = wait_ready_slots(g, 3, exclude=set(before.values()))
    assert sorted(after) == [0, 1, 2]
    assert {get(g, "/")["version"] for _ in range(10)} == {"2"}
    rollout = status(g)["rollout"]
    assert rollout["state"] == "done" and rollout["done"] == 3 and rollout["batch"] == int(batch)


def test_bad_deploy_stops_the_rollout_and_old_workers_keep_serving(gunicorn_factory: Any, tmp_path: Path) -> None:
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = start(gunicorn_factory, 2, APP_VERSION_FILE=str(version))
    before = wait_ready_slots(g, 2)
    version.write_text("broken")
    with Load(g) as load:
        r = cli(g, "reload", "--rolling")
        time.sleep(0.5)
    assert r.returncode == 1
    assert "rollout stopped" in (r.stdout + r.stderr)
    assert "this deploy is broken on purpose" in (r.stdout + r.stderr) or "failed" in (r.stdout + r.stderr)
    assert load.failed == [] and load.versions == {"1"}
    assert g.alive()
    wait_for(lambda: ready_slots(g) == before, 10, what="old workers back in their slots")
    assert status(g)["rollout"]["state"] == "failed"


# -- status, scale, metrics ------------------------------------------------------------


def test_status_and_scale(gunicorn_factory: Any) -> None:
    g = start(gunicorn_factory, 2)
    wait_ready_slots(g, 2)
    for _ in range(5):
        get(g, "/")
    text = cli(g, "status").stdout
    assert "SLOT" in text and "TOTAL" in text and "ready" in text
    wait_for(lambda: status(g)["totals"]["requests"] >= 5, 5)
    st = status(g)
    assert st["workers_target"] == 2 and st["primary_pid"] == g.master_pid
    for w in st["workers"]:
        assert w["rss"] > 0 and w["uptime"] > 0 and w["restarts"] == 0
    assert cli(g, "scale", "3").returncode == 0
    wait_ready_slots(g, 3)
    assert cli(g, "scale", "1").returncode == 0
    wait_for(lambda: [w["slot"] for w in status(g)["workers"]] == [0], 15)
    bad = cli(g, "scale", "0")
    assert bad.returncode != 0


def test_status_finds_no_instance_clearly(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([CLI, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "no gunicorn-ext instance" in r.stderr


def test_metrics_counters_survive_a_worker_replacement(gunicorn_factory: Any) -> None:
    g = gunicorn_factory("app:app", config=Path(__file__).parent.parent / "examples/flask_app/cluster_conf.py",
                         cwd=Path(__file__).parent.parent / "examples/flask_app", workers=2)

    def requests_total() -> dict[str, float]:
        text = requests.get(g.url("/metrics"), timeout=10).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "gunicorn_ext_requests":
                for s in fam.samples:
                    if s.name == "gunicorn_ext_requests_total":
                        out[s.labels["slot"]] = s.value
        return out

    for _ in range(20):
        get(g, "/whoami")
    wait_for(lambda: sum(requests_total().values()) >= 20, 10, what="20 requests counted")
    before = requests_total()
    victim = g.worker_pids()[0]
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(g.worker_pids()) == 2 and victim not in g.worker_pids(), 15)
    for _ in range(10):
        get(g, "/whoami")
    time.sleep(1.5)
    after = requests_total()
    for slot, value in before.items():
        assert after.get(slot, 0) >= value, (before, after)
    assert sum(after.values()) >= sum(before.values()) + 10
    text = requests.get(g.url("/metrics"), timeout=10).text
    assert "gunicorn_ext_worker_restarts_total" in text
    assert "gunicorn_ext_request_duration_seconds_bucket" in text
