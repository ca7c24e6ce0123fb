"""Request deadlines (request_timeout, gunicorn_ext/deadlines.py) with real Gunicorn:
a request that hangs gets 503, its stack is logged, its worker is recycled and the slot
serves again; the worker's other requests finish."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import wait_for

APPS = Path(__file__).resolve().parent / "apps"


@pytest.mark.parametrize("worker_class", ["gthread", "sync"])
def test_hung_request_gets_503_and_its_worker_is_recycled(gunicorn_factory: Any,
                                                          worker_class: str) -> None:
    g = gunicorn_factory("hold_app:app", config=APPS / "hold_conf.py", cwd=APPS, workers=1,
                         env={"WORKER_CLASS": worker_class, "THREADS": "4", "WORKERS": "1",
                              "REQUEST_TIMEOUT": "1.5"}, health_path="/pid")
    (old,) = g.wait_workers(1)
    other: dict[str, Any] = {}
    if worker_class == "gthread":
        # Started just before the deadline of the hung one: it must still finish with 200.
        def short() -> None:
            time.sleep(1.0)
            other["r"] = requests.get(g.url("/hold?s=1.5"), timeout=15)

        t = threading.Thread(target=short)
        t.start()
    start = time.monotonic()
    r = requests.get(g.url("/hold?s=25"), timeout=15)
    took = time.monotonic() - start
    assert r.status_code == 503 and r.headers.get("Retry-After") == "1", (r.status_code, r.text)
    assert "deadline" in r.text
    assert took < 12, f"the hung request was answered only after {took:.1f}s"
    if worker_class == "gthread":
        t.join(timeout=20)
        assert other["r"].status_code == 200, "the worker's other request did not finish"
    wait_for(lambda: (pids := g.worker_pids()) and old not in pids, 20,
             what="the worker replaced")
    assert requests.get(g.url("/pid"), timeout=10).text != str(old)
    log = g.log_path.read_text()
    assert "request deadline: GET /hold?s=25 ran" in log
    assert "hold_app.py" in log and "time.sleep" in log, "the hung thread's stack is logged"


def test_no_deadline_by_default(gunicorn_factory: Any) -> None:
    g = gunicorn_factory("hold_app:app", config=APPS / "hold_conf.py", cwd=APPS, workers=1,
                         env={"WORKER_CLASS": "gthread", "THREADS": "2", "WORKERS": "1"},
                         health_path="/pid")
    (pid,) = g.wait_workers(1)
    assert requests.get(g.url("/hold?s=2.5"), timeout=15).status_code == 200
    assert g.worker_pids() == [pid]
