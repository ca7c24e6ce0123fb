"""Two instances of the example app behind the rendered nginx, on one real redis-server.

The set-up of the chaos test (tests/test_chaos.py) and benchmark (bench/chaos.py), as
a user would run it: each instance is ``gunicorn -c cluster_conf.py app:app`` in
examples/flask_app (what ``make run`` starts) with BIND, WORKERS, STATE_URL and
SECRET_KEY in its environment; nginx runs the config of
``gunicorn_ext.nginx.render`` (what ``gunicorn-ext nginx render`` prints) with both
instances as backends. ``kind="plain"`` runs the same app under plain Gunicorn
(tests/apps/example_plain_conf.py: the same settings, no gunicorn-ext) behind the same
nginx config: the baseline.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests
from harness import Gunicorn, HarnessError, RedisServer, free_port, running_nginx, wait_for

from gunicorn_ext.nginx import render, wrapper_conf

__all__ = ["APPS", "EXAMPLE", "Cluster", "example_cluster"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask_app"
APPS = Path(__file__).resolve().parent / "apps"
#: ``ext``: the example's own config; ``plain``: the same without gunicorn-ext;
#: ``ext_env``: every gunicorn-ext setting from the environment (tests/apps/life_conf.py),
#: for short breaker cool-downs in tests.
CONFIGS = {"ext": EXAMPLE / "cluster_conf.py", "plain": APPS / "example_plain_conf.py",
           "ext_env": APPS / "life_conf.py"}
SECRET = "chaos-test-secret-key-not-for-production"


@dataclass
class Cluster:
    kind: str
    instances: list[Gunicorn]
    url: str  # nginx
    nginx_dir: Path
    redis: RedisServer | None
    workers: int

    def kill_worker(self, instance: int, rng: random.Random) -> int | None:
        """SIGKILL one live worker of *instance*, chosen by *rng*; its pid, or None."""
        pids = self.instances[instance].worker_pids()
        if not pids:
            return None
        pid = rng.choice(pids)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return pid

    def serving_pids(self, instance: int, timeout: float) -> set[int]:
        """Pids answering ``GET /whoami`` straight to *instance* on fresh connections,
        polled until every one of its live workers answered or *timeout* passed."""
        g = self.instances[instance]
        seen: set[int] = set()

        def every_worker() -> bool:
            for _ in range(4 * self.workers):
                with contextlib.suppress(requests.RequestException, ValueError):
                    r = requests.get(g.url("/whoami"), headers={"Connection": "close"}, timeout=2)
                    if r.status_code == 200:
                        seen.add(int(r.json()["pid"]))
            live = set(g.worker_pids())
            return len(live) == self.workers and live <= seen

        with contextlib.suppress(HarnessError):
            wait_for(every_worker, timeout, interval=0.2, what="every worker answering")
        return seen & set(g.worker_pids())

    def nginx_errors(self) -> str:
        """nginx's error log (one line per failed upstream attempt, among others)."""
        with contextlib.suppress(OSError):
            return (self.nginx_dir / "error.log").read_text(errors="replace")
        return ""


@contextlib.contextmanager
def example_cluster(directory: Path, *, kind: str = "ext", workers: int = 3,
                    redis: RedisServer | None = None, app: str = "app:app",
                    env: Mapping[str, str] | None = None,
                    conf: Callable[[list[str], int], str] | None = None,
                    ready_timeout: float = 60.0) -> Iterator[Cluster]:
    """Start two instances (*kind* ``ext`` or ``plain``) and nginx; always stop them.

    STATE_URL is *redis*'s URL when given (else the example's SQLite default, one file
    per cluster in *directory*). nginx's config is ``render(backends, listen,
    "127.0.0.1")`` unless *conf* (called with the same backends and port) gives another.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state_url = redis.url if redis is not None else f"sqlite:///{directory / 'state.db'}"
    base_env = {"STATE_URL": state_url, "SECRET_KEY": SECRET, **(env or {})}
    instances: list[Gunicorn] = []
    try:
        for i in range(2):
            g = Gunicorn(app, config=CONFIGS[kind], cwd=EXAMPLE, workers=workers,
                         env=base_env, log_dir=directory, name=f"{kind}-{i}")
            instances.append(g)
            g.start()
        for g in instances:
            g.wait_ready(ready_timeout)
            g.wait_workers(workers, timeout=ready_timeout)
        listen = free_port()
        backends = [g.bind for g in instances]
        text = (conf(backends, listen) if conf is not None
                else render(backends, listen, "127.0.0.1", default_server=False))
        # Loopback only (render() writes `listen PORT`, all addresses).
        text = re.sub(rf"listen {listen}\b", f"listen 127.0.0.1:{listen}", text)
        ngx = directory / f"nginx-{kind}"
        ngx.mkdir(exist_ok=True)
        (ngx / "site.conf").write_text(text)
        (ngx / "nginx.conf").write_text(wrapper_conf(
            [str(ngx / "site.conf")], str(ngx), user="root" if os.geteuid() == 0 else None))
        with running_nginx(ngx / "nginx.conf", listen):
            yield Cluster(kind, instances, f"http://127.0.0.1:{listen}", ngx, redis, workers)
    finally:
        for g in instances:
            g.stop()
