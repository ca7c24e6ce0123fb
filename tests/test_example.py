"""The example app (examples/flask_app), the acceptance surface, served by real Gunicorn."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from harness import Gunicorn, wait_for
from prometheus_client.parser import text_string_to_metric_families

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "flask_app"


def fresh(g: Gunicorn, path: str) -> requests.Response:
    return requests.get(g.url(path), headers={"Connection": "close"}, timeout=10)


def start(factory: Any, example: str = "flask_app", worker_class: str | None = None,
          **env: str) -> Gunicorn:
    """*example* (``examples/<example>``) with its cluster_conf.py and 2 workers, as
    ``make run`` starts it; *worker_class* sets ``WORKER_CLASS`` (else its default)."""
    where = EXAMPLES / example
    env = {"INSTANCE": "test-instance", **env}
    if worker_class is not None:
        env["WORKER_CLASS"] = worker_class
    return factory("app:app", config=where / "cluster_conf.py",  # type: ignore[no-any-return]
                   cwd=where, workers=2, env=env)


def check_endpoints(g: Gunicorn) -> None:
    """What every example answers under every worker class (tests/test_example_classes.py
    runs this under the others): health, identity, the bus, a broadcast, the metrics."""
    r = fresh(g, "/healthz")
    assert r.status_code == 200 and r.text == "ok"
    who = fresh(g, "/whoami").json()
    assert set(who) == {"pid", "slot", "instance"} and who["instance"] == "test-instance"
    assert who["slot"] in (0, 1)

    def both_ready() -> dict[str, Any] | None:
        c = fresh(g, "/cluster").json()
        return c if sorted(w["slot"] for w in c["workers"] if w["ready"]) == [0, 1] else None

    cluster = wait_for(both_ready, 15, what="both workers on the bus")
    assert cluster["primary_pid"] == g.master_pid
    assert {w["pid"] for w in cluster["workers"]} == set(g.worker_pids())

    r = requests.post(g.url("/broadcast"), json={"message": "hello all"}, timeout=10)
    assert r.status_code == 202
    seen: set[int] = set()
    deadline = time.monotonic() + 15
    while seen != {0, 1} and time.monotonic() < deadline:
        inbox = fresh(g, "/inbox").json()
        if "hello all" in inbox["messages"]:
            assert inbox["messages"].count("hello all") == 1  # exactly once
            seen.add(inbox["slot"])
    assert seen == {0, 1}

    def counted() -> dict[str, Any] | None:  # workers report every stats_interval
        m = fresh(g, "/metrics")
        assert m.status_code == 200 and m.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(m.text)}
        assert {"gunicorn_ext_requests", "gunicorn_ext_request_duration_seconds",
                "gunicorn_ext_worker_rss_bytes"} <= set(families)
        total = sum(s.value for s in families["gunicorn_ext_requests"].samples
                    if s.name == "gunicorn_ext_requests_total")
        return families if total >= 8 else None  # the requests above, per slot

    families = wait_for(counted, 20, interval=0.5, what="the requests counted")
    latency = [s for s in families["gunicorn_ext_request_duration_seconds"].samples
               if s.name.endswith("_count")]
    assert sum(s.value for s in latency) >= 8


def test_endpoints(gunicorn_factory: Any) -> None:
    check_endpoints(start(gunicorn_factory))  # bad input: test_bad_input_is_a_4xx_...


def test_too_many_workers_warns(gunicorn_factory: Any) -> None:
    from gunicorn_ext.cpus import usable_cpus

    n = 2 * usable_cpus() + 1
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=n)
    assert f"WORKERS={n} is more than twice the {usable_cpus()} CPU(s)" in g.log_text()


def test_invalid_setting_fails_at_startup_with_a_clear_message(tmp_path: Path) -> None:
    conf = tmp_path / "bad_conf.py"
    conf.write_text("import gunicorn_ext\nbind = '127.0.0.1:0'\n"
                    "gunicorn_ext.enable(globals(), restart_breaker_scope='galaxy')\n")
    r = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(conf), "--chdir", str(EXAMPLE),
                        "app:app"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "restart_breaker_scope must be 'slot' or 'instance', got 'galaxy'" in r.stderr


def _state_urls(redis_url: str, tmp_path: Path) -> list[str]:
    return [f"sqlite:///{tmp_path / 'state.db'}", redis_url]


def test_counter_and_hits_are_shared_by_every_worker(gunicorn_factory: Any, redis_server: Any,
                                                     tmp_path: Path) -> None:
    for url in _state_urls(redis_server.url, tmp_path):
        g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE,
                             workers=2, env={"STATE_URL": url, "SECRET_KEY": "k" * 32})
        s = requests.Session()
        slots = set()
        for i in range(1, 201):  # until both workers answered (the kernel picks who accepts)
            r = s.get(g.url("/counter"), headers={"Connection": "close"}, timeout=10).json()
            assert r["count"] == i  # one session, whichever worker answers
            slots.add(r["slot"])
            if slots == {0, 1} and i >= 20:
                break
        assert slots == {0, 1}
        cookie = s.cookies.get("session") or ""
        assert cookie and "count" not in cookie  # the data is server-side
        hits = [fresh(g, "/hits").json()["hits"] for _ in range(20)]
        assert hits == list(range(1, 21)), url
        assert fresh(g, "/healthz").headers.get("Set-Cookie") is None
        g.stop()


def cli_status(g: Gunicorn) -> dict[str, Any]:
    r = subprocess.run([str(Path(sys.executable).parent / "gunicorn-ext"), "status", "--json"],
                       env=g.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def post_raw(g: Gunicorn, body: bytes, path: str = "/broadcast") -> requests.Response:
    return requests.post(g.url(path), data=body, headers={"Content-Type": "application/json"},
                         timeout=30)


def test_bad_input_is_a_4xx_and_every_worker_stays_on_the_bus(gunicorn_factory: Any) -> None:
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2)

    def both_ready() -> dict[int, int] | None:
        c = fresh(g, "/cluster").json()
        slots = {w["slot"]: w["pid"] for w in c["workers"] if w["ready"]}
        return slots if sorted(slots) == [0, 1] else None

    before = wait_for(both_ready, 15, what="both workers on the bus")

    # 5 MB: parsed (under MAX_CONTENT_LENGTH), then refused by the bus in the sender;
    # until both workers have refused one.
    refused: set[int] = set()
    for _ in range(30):
        r = requests.post(g.url("/broadcast"), json={"message": "x" * 5_000_000},
                          headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 413, r.text
        assert "over the bus limit of 4194304 bytes (ipc_max_frame)" in r.json()["error"]
        refused.add(r.json()["slot"])
        if refused == {0, 1}:
            break
    assert refused == {0, 1}
    # Over Flask's MAX_CONTENT_LENGTH: 413 before the body is parsed.
    r = post_raw(g, b'{"message": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    assert r.status_code == 413 and "over 8 MiB" in r.json()["error"]

    cases: list[tuple[bytes, str]] = [
        (json.dumps({"message": 2**70}).encode(), "can't be sent on the bus"),
        (json.dumps({"message": [1, -(2**64)]}).encode(), "can't be sent on the bus"),
        (b'{"message": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than"),
        (b'{"message": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than"),
        (b'{"message": "unterminated', "not valid JSON"),
        (b'{"message": "\xff\xfe"}', "not valid JSON"),
        (b'{"message": ' + b"9" * 5000 + b"}", "not valid JSON"),  # over Python's int digits
        (b"[1, 2]", "expected a JSON object"),
        (b"", "not valid JSON"),
    ]
    for body, reason in cases:
        r = post_raw(g, body)
        assert r.status_code == 400, (body[:40], r.status_code, r.text[:200])
        assert reason in r.json()["error"], (body[:40], r.text[:200])

    # Fine input still goes through: nesting within bounds, ints within 64 bits.
    ok = {"message": [[[[2**63]]], -(2**63), "ok"]}
    assert requests.post(g.url("/broadcast"), json=ok, timeout=10).status_code == 202

    # Every worker is still on the bus, and every view agrees.
    assert both_ready() == before
    assert set(before.values()) == set(g.worker_pids())
    st = cli_status(g)
    assert {w["slot"]: w["pid"] for w in st["workers"] if w["state"] == "ready"} == before
    for _ in range(10):
        m = fresh(g, "/metrics")
        assert m.status_code == 200, m.text
        c = fresh(g, "/cluster")
        assert c.status_code == 200 and len(c.json()["workers"]) == 2
    log = g.log_text()
    assert "lost its bus" not in log and "closing the bus connection" not in log
    assert "Traceback" not in log and "Error handling request" not in log
