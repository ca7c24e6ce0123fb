"""Rolling HUP (``hup="rolling"``, on in the example) with real Gunicorn and real clients:
SIGHUP re-reads the config and replaces workers one batch at a time under load; a
config that changes a restart-only setting, or can't be read, is refused with one log
line while the old workers keep serving; a broken deploy stops the rollout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, free_port, wait_for
from test_graceful_stop import MixedLoad

from gunicorn_ext.settings import Settings, SettingsError

APPS = Path(__file__).parent / "apps"
EXAMPLE = Path(__file__).parent.parent / "examples/flask_app"
CLI = str(Path(sys.executable).parent / "gunicorn-ext")


def status(g: Gunicorn) -> dict[str, Any]:
    r = subprocess.run([CLI, "status", "--json"], env=g.env, capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def ready_pids(g: Gunicorn) -> dict[int, int]:
    return {w["slot"]: w["pid"] for w in status(g)["workers"] if w["state"] == "ready"}


def wait_ready(g: Gunicorn, n: int, exclude: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    def ok() -> dict[int, int] | None:
        s = ready_pids(g)
        return s if sorted(s) == list(range(n)) and not exclude & set(s.values()) else None

    return wait_for(ok, 40, interval=0.1, what=f"{n} ready slots")  # type: ignore[no-any-return]


def example(factory: Any, tmp_path: Path, workers: int, config: Path | None = None) -> Gunicorn:
    env = {"STATE_URL": f"sqlite:///{tmp_path / 'state.db'}", "THREADS": "8"}
    return factory("app:app", config=config or EXAMPLE / "cluster_conf.py", cwd=EXAMPLE,  # type: ignore[no-any-return]
                   workers=workers, env=env)


def hup_and_wait(g: Gunicorn, needle: str, timeout: float = 40) -> str:
    """SIGHUP, then the log from that HUP on once it contains *needle*."""
    start = len(g.log_text())
    g.signal(1)
    wait_for(lambda: needle in g.log_text()[start:], timeout, what=repr(needle))
    return g.log_text()[start:]


def test_rolling_hup_of_the_example_under_load_fails_no_request(gunicorn_factory: Any,
                                                                tmp_path: Path) -> None:
    g = example(gunicorn_factory, tmp_path, 3)
    before = wait_ready(g, 3)
    with MixedLoad(g.base_url, threads=4) as load:
        time.sleep(1.0)
        log = hup_and_wait(g, "rolling reload done")
        time.sleep(0.5)
    assert load.failed == [], load.failed[:5]
    assert load.ok > 50 and load.posts > 10
    after = wait_ready(g, 3, exclude=set(before.values()))
    assert sorted(after) == [0, 1, 2]
    # One at a time (reload_batch=1), each old worker stopped after its successor was ready.
    assert [f"({i}/3)" in log for i in (1, 2, 3)] == [True] * 3
    assert "was sent SIGHUP" not in log  # the workers are replaced, never HUPed
    assert status(g)["rollout"]["state"] == "done"


def _conf_copy(tmp_path: Path) -> Path:
    conf = tmp_path / "cluster_conf.py"
    conf.write_text((EXAMPLE / "cluster_conf.py").read_text())
    return conf


def _edit(conf: Path, old: str, new: str) -> None:
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new))


def test_rolling_hup_applies_the_reread_config(gunicorn_factory: Any, tmp_path: Path) -> None:
    """Gunicorn settings (workers) and gunicorn-ext settings given to enable()
    (reload_batch) in the re-read file both take effect."""
    conf = _conf_copy(tmp_path)
    g = example(gunicorn_factory, tmp_path, 2, config=conf)
    before = wait_ready(g, 2)
    _edit(conf, 'hup="rolling")', 'hup="rolling", reload_batch=2)')
    conf.write_text(conf.read_text() + "workers = 3\n")
    with MixedLoad(g.base_url, threads=2) as load:
        log = hup_and_wait(g, "rolling reload done")
    assert load.failed == [], load.failed[:5]
    assert "config re-read (3 workers, reload_batch 2)" in log
    after = wait_ready(g, 3, exclude=set(before.values()))
    assert sorted(after) == [0, 1, 2]
    s = status(g)
    assert s["workers_target"] == 3 and s["rollout"]["batch"] == 2


def test_rolling_hup_refuses_what_needs_a_restart_and_keeps_serving(gunicorn_factory: Any,
                                                                    tmp_path: Path) -> None:
    conf = _conf_copy(tmp_path)
    original = conf.read_text()
    g = example(gunicorn_factory, tmp_path, 2, config=conf)
    before = wait_ready(g, 2)
    other = free_port()
    bad_configs = {
        f'bind = "127.0.0.1:{other}"\n': "these settings need a restart: bind: ",
        'worker_class = "sync"\nthreads = 1\n': "these settings need a restart: worker_class: ",
        "syntax error(\n": "the config could not be read",
    }
    for tail, why in bad_configs.items():
        conf.write_text(original + tail)
        log = hup_and_wait(g, "SIGHUP refused")
        assert why in log, log
        assert log.count("SIGHUP refused") == 1
        assert "the config in use is unchanged and the old workers keep serving" in log
        assert requests.get(g.url("/whoami"), timeout=10).status_code == 200
    # a gunicorn-ext setting that needs a restart, and a bad one
    conf.write_text(original.replace('hup="rolling")', 'hup="rolling", even_spread=False)'))
    assert "even_spread: None -> False" in hup_and_wait(g, "SIGHUP refused")
    conf.write_text(original.replace('hup="rolling")', 'hup="rolling", reload_batch=0)'))
    assert "the config could not be read" in hup_and_wait(g, "SIGHUP refused")
    conf.write_text(original.replace("gunicorn_ext.enable(", "dict("))
    assert "does not call gunicorn_ext.enable()" in hup_and_wait(g, "SIGHUP refused")
    time.sleep(0.5)
    assert ready_pids(g) == before  # nothing was replaced
    assert status(g)["rollout"]["state"] == "idle"
    try:
        requests.get(f"http://127.0.0.1:{other}/", timeout=2)
        raise AssertionError("the refused bind must not be listening")
    except requests.ConnectionError:
        pass
    # The config in use still works: a good HUP afterwards rolls as usual.
    conf.write_text(original)
    hup_and_wait(g, "rolling reload done")
    wait_ready(g, 2, exclude=set(before.values()))


def test_rolling_hup_of_a_broken_deploy_stops_and_old_workers_keep_serving(
        gunicorn_factory: Any, tmp_path: Path) -> None:
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = gunicorn_factory("life_app:app", config=APPS / "life_conf.py", cwd=APPS, workers=2,
                         env={"APP_VERSION_FILE": str(version), "HUP": "rolling"})
    before = wait_ready(g, 2)
    version.write_text("broken")
    with MixedLoad(g.base_url, threads=2, get="/", post=None) as load:
        log = hup_and_wait(g, "rolling reload rollout stopped")
        time.sleep(0.5)
    assert "this deploy is broken on purpose" in g.log_text()
    assert "old worker(s) keep serving" in log
    assert load.failed == [] and load.ok > 20
    assert g.alive()
    wait_for(lambda: ready_pids(g) == before, 10, what="old workers back in their slots")
    assert status(g)["rollout"]["state"] == "failed"


def test_a_rollout_whose_new_worker_never_gets_ready_keeps_every_old_worker(
        gunicorn_factory: Any, tmp_path: Path) -> None:
    """The stopped rollout TERMs its hung new worker; until that one is gone, Gunicorn
    must not count it against ``workers`` and stop an old worker instead."""
    version = tmp_path / "VERSION"
    version.write_text("1")
    g = gunicorn_factory("life_app:app", config=APPS / "life_conf.py", cwd=APPS, workers=2,
                         env={"APP_VERSION_FILE": str(version), "HUP": "rolling",
                              "READY_TIMEOUT": "2"})
    before = wait_ready(g, 2)
    version.write_text("hang")
    log = hup_and_wait(g, "rolling reload rollout stopped")
    assert "did not report ready within 2s" in log and "2 old worker(s) keep serving" in log
    time.sleep(1.5)
    assert ready_pids(g) == before
    hung = [w["pid"] for w in status(g)["workers"] if w["pid"] not in before.values()]
    assert len(hung) == 1  # TERMed, but stuck in its app import (Gunicorn's timeout
    os.kill(hung[0], signal.SIGKILL)  # starts with the first heartbeat, after the import)
    wait_for(lambda: len(status(g)["workers"]) == 2, 20, what="the hung worker gone")
    time.sleep(0.5)
    assert ready_pids(g) == before  # and nothing replaced an old one meanwhile
    assert requests.get(g.url("/"), timeout=10).status_code == 200


def test_the_hup_setting_is_validated() -> None:
    assert Settings().hup == "gunicorn" and Settings(hup="rolling").hup == "rolling"
    with pytest.raises(SettingsError, match="hup must be 'gunicorn' or 'rolling'"):
        Settings(hup="roll")
