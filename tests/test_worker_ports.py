"""Per-worker ports: slot N answers on base+N, across replacement and rolling reload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests
from harness import free_port_pair, wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")


def whoami(port: int) -> dict[str, Any]:
    r = requests.get(f"http://127.0.0.1:{port}/whoami", headers={"Connection": "close"}, timeout=5)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def test_each_slot_has_its_own_port(gunicorn_factory: Any, tmp_path: Path) -> None:
    base = free_port_pair()
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         env={"WORKER_PORTS_BASE": str(base),
                              "STATE_URL": f"sqlite:///{tmp_path / 's.db'}"})
    wait_for(lambda: all(_answers(base + s) for s in (0, 1)), 15, what="both worker ports")
    for slot in (0, 1):
        pids = {whoami(base + slot)["pid"] for _ in range(10)}
        assert len(pids) == 1 and {whoami(base + slot)["slot"]} == {slot}
    shared = {whoami(g.port)["slot"] for _ in range(40)}
    assert shared == {0, 1}  # the shared port still balances

    old = whoami(base + 1)["pid"]
    os.kill(old, signal.SIGKILL)
    def slot1_replaced() -> bool:
        try:
            return bool(whoami(base + 1)["pid"] != old)
        except requests.RequestException:
            return False

    wait_for(slot1_replaced, 15, what="the replacement on slot 1's port")
    assert whoami(base + 1)["slot"] == 1

    before = {s: whoami(base + s)["pid"] for s in (0, 1)}
    r = subprocess.run([CLI, "reload", "--rolling"], env=g.env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr

    def replaced() -> bool:
        try:
            return all(whoami(base + s)["pid"] != before[s] for s in (0, 1))
        except requests.RequestException:  # the old worker of a slot closing its port
            return False

    wait_for(replaced, 20, what="new workers on their slot ports")


def _answers(port: int) -> bool:
    try:
        whoami(port)
        return True
    except requests.RequestException:
        return False
