"""The examples under the other worker classes: examples/flask_app with WORKER_CLASS=gevent,
examples/asgi_app (``make run-asgi``) under ``asgi`` and ``uvicorn_worker.UvicornWorker``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, free_port_pair, wait_for
from prometheus_client.parser import text_string_to_metric_families

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = [("flask_app", "gevent"), ("asgi_app", "asgi"),
         ("asgi_app", "uvicorn_worker.UvicornWorker")]


def fresh(g: Gunicorn, path: str) -> requests.Response:
    return requests.get(g.url(path), headers={"Connection": "close"}, timeout=10)


def start(factory: Any, example: str, worker_class: str, **env: str) -> Gunicorn:
    where = EXAMPLES / example
    return factory("app:app", config=where / "cluster_conf.py", cwd=where,  # type: ignore[no-any-return]
                   workers=2, env={"INSTANCE": "test-instance", "WORKER_CLASS": worker_class,
                                   **env})


@pytest.mark.parametrize(("example", "worker_class"), CASES)
def test_endpoints(gunicorn_factory: Any, example: str, worker_class: str) -> None:
    g = start(gunicorn_factory, example, worker_class)
    r = fresh(g, "/healthz")
    assert r.status_code == 200 and r.text == "ok"
    who = fresh(g, "/whoami").json()
    assert set(who) == {"pid", "slot", "instance"} and who["instance"] == "test-instance"

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

    bad = requests.post(g.url("/broadcast"), data="nope", timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    big = requests.post(g.url("/broadcast"), json={"message": "x" * (5 << 20)}, timeout=30)
    assert big.status_code == 413  # over ipc_max_frame: refused before sending
    assert fresh(g, "/cluster").status_code == 200  # and the bus is fine

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


@pytest.mark.parametrize("worker_class", ["asgi", "uvicorn_worker.UvicornWorker"])
def test_asgi_example_asks_a_peer_worker(gunicorn_factory: Any, worker_class: str) -> None:
    g = start(gunicorn_factory, "asgi_app", worker_class)
    for slot in (0, 1):
        body = wait_for(lambda s=slot: (r := fresh(g, f"/peer?slot={s}")).ok and r.json(), 15,
                        what=f"slot {slot} answers")
        assert body["slot"] == slot and body["asked_by"] in (0, 1)
    assert fresh(g, "/peer?slot=7").status_code == 404
    assert fresh(g, "/peer?slot=x").status_code == 400
    assert fresh(g, "/nope").status_code == 404


@pytest.mark.parametrize(("example", "worker_class"), CASES)
def test_worker_ports_pin_with_the_route_cookie(gunicorn_factory: Any, example: str,
                                               worker_class: str) -> None:
    base = free_port_pair()
    g = start(gunicorn_factory, example, worker_class, WORKER_PORTS_BASE=str(base))
    for slot in (0, 1):
        url = f"http://127.0.0.1:{base + slot}/whoami"
        r = wait_for(lambda u=url: _get(u), 15, what=f"port of slot {slot}")
        assert r.json()["slot"] == slot
        assert r.headers["set-cookie"].startswith(f"gx_route=127_0_0_1_{base + slot};")
        assert "HttpOnly" in r.headers["set-cookie"]
    shared = fresh(g, "/whoami")  # the shared port's worker pins to its own port too
    assert f"gx_route=127_0_0_1_{base + shared.json()['slot']};" in shared.headers["set-cookie"]


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=5)
    except requests.RequestException:
        return None
