"""The examples under the other worker classes: examples/flask_app with WORKER_CLASS=gevent,
examples/asgi_app (``make run-asgi``) under ``asgi`` and ``uvicorn_worker.UvicornWorker``."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from harness import free_port_pair, wait_for
from test_example import check_endpoints, fresh, start

CASES = [("flask_app", "gevent"), ("asgi_app", "asgi"),
         ("asgi_app", "uvicorn_worker.UvicornWorker")]


@pytest.mark.parametrize(("example", "worker_class"), CASES)
def test_endpoints(gunicorn_factory: Any, example: str, worker_class: str) -> None:
    g = start(gunicorn_factory, example, worker_class)
    check_endpoints(g)
    # Bad input under this worker class's body handling (gthread: test_example.py's
    # test_bad_input_is_a_4xx_and_every_worker_stays_on_the_bus, in full).
    bad = requests.post(g.url("/broadcast"), data="nope", timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    big = requests.post(g.url("/broadcast"), json={"message": "x" * (5 << 20)}, timeout=30)
    assert big.status_code == 413  # over ipc_max_frame: refused before sending
    assert fresh(g, "/cluster").status_code == 200  # and the bus is fine


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
