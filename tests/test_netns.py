"""The bus bridge across separate network hosts: Linux network namespaces.

A fixture builds a small private network: a "switch" namespace holding a Linux bridge,
and one namespace per host, each joined to the switch by a veth pair, with its own
address in 10.213.14.0/24 (which exists only inside these namespaces) and its own
loopback. redis-server runs on one host, an example instance (``examples/flask_app``,
``cluster_conf.py``, two workers on per-worker ports) on each of two others, and the test
itself (the HTTP, Socket.IO and Redis clients) on a fourth: its thread enters that
namespace with ``setns(2)`` for the test and leaves it after. Nothing is ever sent to an
address outside the namespaces, and every namespace is deleted afterwards (deleting a
namespace deletes its veth ends).

Checked on that topology: ``POST /broadcast`` and Socket.IO messages reach every worker
of both instances once, over one Redis connection per primary (``CLIENT LIST`` shows
them coming from the two instance hosts); ``/hits`` is shared; redis-server killed, then
restarted, and the Redis host's link cut, then restored: local delivery goes on, the
sender is told, one log line at loss and one at recovery, no restart needed. And an
instance host's link cut under load behind the rendered nginx: only the requests in
flight on that host fail, its clients are re-pinned to the other instance with their
sessions, and the restored host serves again with the same processes; a silent WebSocket
to that host is ended by TCP keepalive (``proxy_socket_keepalive``) and stays open without.

Needs root (``ip netns add``): skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, RedisServer, find_binary, free_port, serves, wait_for
from test_chat import RawClient, SioClient, _assert_each_gets_it_once, _warm_up

from gunicorn_ext.nginx import Failover, render, route_name

pytestmark = [pytest.mark.slow, pytest.mark.redis]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
NET = "10.213.14"
HOSTS = {"redis": f"{NET}.1", "east": f"{NET}.2", "west": f"{NET}.3", "client": f"{NET}.9"}
PORT = 8000
WORKER_PORTS = 9000
#: nginx's ports on the clients' host, for the WebSocket tests (the namespace is private:
#: nothing else listens there), allowed as browser origins by the example's chat.
WS_NGINX_PORTS = (8080, 8081)
TIMEOUT = 15.0
CLONE_NEWNET = 0x40000000
IP = find_binary("ip")


def _ip(*args: str) -> None:
    assert IP is not None
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


class Network:
    """The namespaces, the switch and the links; :meth:`close` deletes them all."""

    def __init__(self) -> None:
        self.prefix = f"gx-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []
        self.switch = self._netns("sw")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        self.ns = {host: self._host(host, addr) for host, addr in HOSTS.items()}

    def _netns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        _ip("netns", "add", full)
        self.created.append(full)
        _ip("-n", full, "link", "set", "lo", "up")
        return full

    def _host(self, host: str, addr: str) -> str:
        ns = self._netns(host)
        # Both ends are made inside namespaces: nothing appears in the test's own.
        _ip("-n", self.switch, "link", "add", f"p-{host}", "type", "veth",
            "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", f"p-{host}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def link(self, host: str, up: bool) -> None:
        """Plug or unplug ``host``'s cable at the switch."""
        _ip("-n", self.switch, "link", "set", f"p-{host}", "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run([IP or "ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.created.clear()


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread (and the threads it starts) in network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        enter(target)
        try:
            yield
        finally:
            enter(home)
    finally:
        os.close(target)
        os.close(home)


class NsRedis(RedisServer):
    def __init__(self, ns: str, host: str, directory: Path) -> None:
        # Clients come from other hosts of the private network, so no protected mode.
        super().__init__(directory, port=6379, extra_args=["--protected-mode", "no"])
        self.ns, self.host = ns, host

    @property
    def command(self) -> list[str]:
        return [IP or "ip", "netns", "exec", self.ns, *super().command]


class NsGunicorn(Gunicorn):
    def __init__(self, ns: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ns = ns

    @property
    def command(self) -> list[str]:
        return [IP or "ip", "netns", "exec", self.ns, *super().command]


@dataclass
class Cluster:
    net: Network
    redis: NsRedis
    east: NsGunicorn
    west: NsGunicorn

    def worker_ports(self) -> list[tuple[str, int]]:
        return [(HOSTS[name], WORKER_PORTS + slot) for name in ("east", "west") for slot in (0, 1)]


def _can_make_namespaces() -> str | None:
    if IP is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"gx-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"the kernel refused a network namespace: {exc.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    why = _can_make_namespaces()
    if why is not None:
        pytest.skip(why)
    if find_binary("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make system-deps`")
    net = Network()
    started: list[Any] = []
    try:
        with inside(net.ns["client"]):
            r = NsRedis(net.ns["redis"], HOSTS["redis"], tmp_path / "redis")
            started.append(r)
            r.start()
            state = f"redis://{HOSTS['redis']}:6379/0"
            instances = []
            for name in ("east", "west"):
                g = NsGunicorn(net.ns[name], "app:app", config=EXAMPLE / "cluster_conf.py",
                               cwd=EXAMPLE, workers=2, host=HOSTS[name], port=PORT,
                               log_dir=tmp_path / name, name=f"gunicorn-{name}",
                               env={"WORKER_PORTS_BASE": str(WORKER_PORTS), "INSTANCE": name,
                                    "STATE_URL": state, "SECRET_KEY": "k" * 32,
                                    "CHAT_ALLOWED_ORIGINS": ",".join(
                                        f"http://127.0.0.1:{p}" for p in WS_NGINX_PORTS)})
                started.append(g)
                instances.append(g.start())
            for g in instances:
                g.wait_ready(30)
                wait_for(lambda g=g: all(serves(WORKER_PORTS + s, host=g.host) for s in (0, 1)),
                         20, what=f"the worker ports of {g.host}")
                g.wait_log("bus bridge up", timeout=TIMEOUT)
            yield Cluster(net, r, instances[0], instances[1])
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()
        net.close()


def _inbox(host: str, port: int) -> list[Any]:
    r = requests.get(f"http://{host}:{port}/inbox", timeout=5)
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


def _broadcast(host: str, port: int, message: str) -> requests.Response:
    return requests.post(f"http://{host}:{port}/broadcast", json={"message": message}, timeout=10)


def _reaches(ports: list[tuple[str, int]], text: str) -> None:
    for host, port in ports:
        wait_for(lambda h=host, p=port: text in _inbox(h, p), TIMEOUT, what=f"{text} on {host}:{port}")


def _lines(g: Gunicorn, pattern: str) -> int:
    return len(re.findall(pattern, g.log_text()))


LOST = r"gunicorn-ext: bus bridge to \S+ is down \(.*\); publications reach this instance"
BACK = r"gunicorn-ext: bus bridge to \S+ is back after"


def test_broadcast_hits_and_socketio_cross_hosts(cluster: Cluster) -> None:
    with inside(cluster.net.ns["client"]):
        every = cluster.worker_ports()
        # One bridge connection per primary, from each instance's own host.
        conns = [c for c in cluster.redis.client().client_list()
                 if c.get("name", "").startswith("gunicorn-ext-bridge")]
        assert sorted(c["addr"].rsplit(":", 1)[0] for c in conns) == [HOSTS["east"], HOSTS["west"]]

        for host, port in (every[0], every[3]):
            text = f"hello-{uuid.uuid4().hex[:8]}"
            r = _broadcast(host, port, text)
            assert r.status_code == 202 and r.json()["delivered"] == "cluster", r.text
            _reaches(every, text)
            time.sleep(0.3)
            assert all(_inbox(h, p).count(text) == 1 for h, p in every)

        east, west = (requests.get(f"http://{HOSTS[n]}:{PORT}/hits", timeout=5).json()["hits"]
                      for n in ("east", "west"))
        assert west == east + 1  # one counter, shared through the Redis host

        clients: list[SioClient] = []
        try:
            for host, port in every:
                clients.append(SioClient(f"http://{host}:{port}"))
            assert {(c.instance, c.slot) for c in clients} == {
                (n, s) for n in ("east", "west") for s in (0, 1)}
            _warm_up(clients)
            for sender in (clients[0], clients[3]):
                _assert_each_gets_it_once(clients, sender, f"sio-{uuid.uuid4().hex[:8]}")
            subscribers = [c for c in cluster.redis.client().client_list() if int(c["sub"]) > 0]
            assert len(subscribers) == 2, subscribers  # 4 workers with clients, 2 primaries
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()


@pytest.mark.nginx
def test_sessions_and_sticky_routing_through_nginx_across_hosts(
        cluster: Cluster, nginx_site: Any) -> None:
    """nginx on the clients' host, in front of the four worker ports of the two instance
    hosts: a client stays on its worker; without its route cookie it lands anywhere,
    and its session (in Redis, on its own host) goes on counting."""
    with inside(cluster.net.ns["client"]):
        listen = free_port()  # in the client host's namespace
        backends = [f"{h}:{p}" for h, p in cluster.worker_ports()]
        conf = render(backends=backends, listen=listen, server_name="127.0.0.1",
                      default_server=False)
        with nginx_site(conf, listen):
            url = f"http://127.0.0.1:{listen}"
            client = requests.Session()
            seen = set()
            for n in range(1, 6):
                r = client.get(f"{url}/counter", timeout=10)
                assert r.status_code == 200 and r.json()["count"] == n, r.text
                seen.add(r.json()["pid"])
            assert len(seen) == 1  # pinned by the route cookie
            route = client.cookies.get("gx_route")
            assert route is not None
            landed = set()
            for n in range(6, 20):
                client.cookies.set("gx_route", None)  # dropped: nginx picks any backend
                r = client.get(f"{url}/counter", timeout=10)
                assert r.status_code == 200 and r.json()["count"] == n, r.text
                who = client.get(f"{url}/whoami", timeout=10).json()
                landed.add(who["instance"])
            assert landed == {"east", "west"}  # the session crossed hosts


def test_redis_killed_on_its_host_then_back(cluster: Cluster) -> None:
    with inside(cluster.net.ns["client"]):
        east_ports, west_ports = cluster.worker_ports()[:2], cluster.worker_ports()[2:]
        cluster.redis.kill()
        cluster.east.wait_log("is down", timeout=TIMEOUT)
        text = f"during-{uuid.uuid4().hex[:8]}"
        r = _broadcast(*east_ports[1], text)
        assert r.status_code == 503 and r.json()["delivered"] == "instance", r.text
        _reaches(east_ports, text)  # local delivery goes on
        cluster.redis.start()
        for g in (cluster.east, cluster.west):
            g.wait_log("is back after", timeout=TIMEOUT)
            assert _lines(g, LOST) == 1 and _lines(g, BACK) == 1
        assert all(text not in _inbox(h, p) for h, p in west_ports)
        text = f"after-{uuid.uuid4().hex[:8]}"
        assert _broadcast(*west_ports[0], text).status_code == 202
        _reaches(east_ports + west_ports, text)


def test_the_redis_hosts_link_cut_then_restored(cluster: Cluster) -> None:
    with inside(cluster.net.ns["client"]):
        east_ports, west_ports = cluster.worker_ports()[:2], cluster.worker_ports()[2:]
        cut = time.monotonic()
        cluster.net.link("redis", up=False)  # no RST, no FIN: only the PING check sees it
        wait_for(lambda: _lines(cluster.east, LOST) == 1, 25, interval=0.2,
                 what="east to see the bridge down")
        noticed = time.monotonic() - cut
        text = f"cut-{uuid.uuid4().hex[:8]}"
        r = _broadcast(*east_ports[0], text)
        assert r.status_code == 503 and r.json()["delivered"] == "instance", r.text
        _reaches(east_ports, text)
        restored = time.monotonic()
        cluster.net.link("redis", up=True)
        for g in (cluster.east, cluster.west):
            wait_for(lambda g=g: _lines(g, BACK) == 1, 25, interval=0.2, what="the bridge back")
            assert _lines(g, LOST) == 1
            assert g.alive()
        healed = time.monotonic() - restored
        text = f"healed-{uuid.uuid4().hex[:8]}"
        assert _broadcast(*east_ports[0], text).status_code == 202
        _reaches(east_ports + west_ports, text)
        print(f"link cut noticed after {noticed:.1f}s; bridge back {healed:.1f}s after restore")


# ------------------------------------------------------- an instance host's link cut

#: The rendered defaults but for a shorter plain-HTTP read timeout (bounded test time);
#: next_upstream_timeout stays below it, as in the defaults: a read timeout is a 504.
CUT_FAILOVER = Failover(read_timeout=6.0, next_upstream_timeout=3.5)
CLIENTS = 8


@dataclass
class _Client:
    """One closed-loop user of ``/counter`` through nginx, with its own session."""

    url: str
    http: requests.Session = field(default_factory=requests.Session)
    # (sent, answered, status, count or None, route cookie after the answer)
    log: list[tuple[float, float, int, int | None, str | None]] = field(default_factory=list)

    def once(self) -> None:
        sent = time.monotonic()
        try:
            r = self.http.get(f"{self.url}/counter", timeout=20)
            status, count = r.status_code, (r.json()["count"] if r.status_code == 200 else None)
        except requests.RequestException:
            status, count = 0, None
        self.log.append((sent, time.monotonic(), status, count, self.http.cookies.get("gx_route")))

    def run(self, stop: threading.Event, limit: int = 2000) -> None:
        while not stop.is_set() and len(self.log) < limit:
            self.once()
            time.sleep(0.01)

    @property
    def route(self) -> str | None:
        return self.http.cookies.get("gx_route")


def _pids(ports: list[tuple[str, int]]) -> set[int]:
    return {requests.get(f"http://{h}:{p}/whoami", timeout=5).json()["pid"] for h, p in ports}


@pytest.mark.nginx
def test_an_instance_hosts_link_cut_under_load_is_survived_and_it_rejoins(
        cluster: Cluster, nginx_site: Any) -> None:
    """nginx on the clients' host, in front of the worker ports of both instance hosts,
    8 clients on ``/counter`` (their sessions in Redis, on its own host). East's link is
    cut at the switch (no RST, no FIN): only requests in flight on east may fail, at most
    one per client pinned there; each of those clients is answered by west within the
    connect timeout and re-pinned, its count going on. The link restored, new clients land
    on east again, served by the same primary and workers (no restart)."""
    with inside(cluster.net.ns["client"]):
        east, west = cluster.worker_ports()[:2], cluster.worker_ports()[2:]
        east_routes = {route_name(f"{h}:{p}") for h, p in east}
        west_routes = {route_name(f"{h}:{p}") for h, p in west}
        east_pids = _pids(east)
        listen = free_port()
        conf = render([f"{h}:{p}" for h, p in east + west], listen, "127.0.0.1",
                      default_server=False, failover=CUT_FAILOVER)
        with nginx_site(conf, listen) as prefix:
            url = f"http://127.0.0.1:{listen}"
            clients = [_Client(url) for _ in range(CLIENTS)]
            for c in clients:
                c.once()  # through the pool: round robin over the four ports pins them
            assert all(c.log[-1][2] == 200 for c in clients), [c.log for c in clients]
            on_east = [c for c in clients if c.route in east_routes]
            assert on_east and len(on_east) < CLIENTS, [c.route for c in clients]
            stop = threading.Event()
            threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
            for t in threads:
                t.start()
            try:
                time.sleep(1.5)
                pinned = {id(c): c.route for c in clients}
                cut = time.monotonic()
                cluster.net.link("east", up=False)

                def all_on_west() -> bool:
                    return all(c.route in west_routes and any(
                        e[0] > cut and e[2] == 200 and e[4] in west_routes for e in c.log)
                        for c in clients)

                wait_for(all_on_west, CUT_FAILOVER.read_timeout + 15, interval=0.2,
                         what="every client answered by west after the cut")
                time.sleep(1.0)  # more load on the survivors
                restored = time.monotonic()
                cluster.net.link("east", up=True)
                # Fresh clients (no cookie) land on the pool: east is in rotation again.
                newcomers: list[_Client] = []

                def east_serves() -> bool:
                    c = _Client(url)
                    c.once()
                    newcomers.append(c)
                    return c.log[-1][2] == 200 and c.route in east_routes

                wait_for(east_serves, 20, interval=0.3, what="a new client served by east")
                rejoined = time.monotonic() - restored
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
            errors = (prefix / "error.log").read_text()

        failures = [(c, e) for c in clients for e in c.log if e[2] != 200]
        during = [e for c in clients for e in c.log if e[0] >= cut and e[2] == 200]
        # Failures: only clients pinned to east when the link went, at most one each, and
        # only requests sent before that client's first answer from west.
        assert all(pinned[id(c)] in east_routes for c, _ in failures), \
            [(pinned[id(c)], e) for c, e in failures]
        per_client = {id(c): sum(1 for d, _ in failures if d is c) for c, _ in failures}
        n_east = sum(1 for r in pinned.values() if r in east_routes)
        seen = [(e[2], round(e[0] - cut, 2), round(e[1] - cut, 2), e[4]) for _, e in failures]
        assert all(n <= 1 for n in per_client.values()), (per_client, seen)
        assert len(failures) <= n_east, seen
        # Read timeouts: a 504, or a response cut after its headers (Gunicorn sends the
        # headers and the body in two writes; nginx had passed the headers on): status 0.
        assert all(e[2] in (504, 0) for _, e in failures), seen
        # ... of requests on the wire to east when it went: sent before the cut, or just
        # after on a connection nginx still had open to east (closed after idle_timeout).
        late = cut + CUT_FAILOVER.idle_timeout + 1.0
        assert all(e[0] < late for _, e in failures), seen
        assert "upstream timed out" in errors and "no live upstreams" not in errors
        # No session lost: every client's count goes on across the move (a request lost in
        # flight may have counted on east before the cut: one step more, never a reset).
        # Before the store bounded unacknowledged writes (TCP_USER_TIMEOUT, state/redis.py),
        # the write of the request in flight on east landed after the restore and set the
        # count back to its value at the cut (3 of 16 runs).
        for c in clients:
            last = None
            for i, (sent, _, status, count, route) in enumerate(c.log):
                if status != 200:
                    continue
                why = (f"count {last} then {count}, sent {sent - cut:.2f}s after the cut "
                       f"({sent - restored:.2f}s after the restore) via {route}, pinned "
                       f"{pinned[id(c)]}: "
                       f"{[(e[3], e[2], round(e[0] - cut, 1)) for e in c.log[max(0, i - 3):i + 2]]}; "
                       f"failures {[(e[2], round(e[0] - cut, 1)) for e in c.log if e[2] != 200]}")
                assert count is not None, why
                assert last is None or last < count <= last + 2, why
                last = count
            assert c.route in west_routes  # re-pinned (stays on west: sticky)
        # The restored host: same primary, same workers, serving again.
        assert cluster.east.alive()
        assert _pids(east) == east_pids
        assert newcomers[-1].log[-1][3] == 1
        moved = [next(e[1] for e in c.log if e[0] > cut and e[2] == 200 and e[4] in west_routes)
                 - cut for c in clients if pinned[id(c)] in east_routes]
        slowest = max(e[1] - e[0] for e in during)
        print(f"link cut under load: {len(failures)} failed of {len(during) + len(failures)} "
              f"requests after the cut ({n_east} clients were on east, bound {n_east}); "
              f"east's clients answered by west {min(moved):.1f}-{max(moved):.1f}s after the "
              f"cut; slowest answered request {slowest:.1f}s; east served a new client "
              f"{rejoined:.1f}s after the restore")




@pytest.mark.nginx
def test_tcp_keepalive_ends_a_websocket_to_a_host_that_vanished(
        cluster: Cluster, nginx_site: Any) -> None:
    """A WebSocket whose client stays silent carries nothing towards its backend, so when
    that backend's host vanishes nothing tells nginx: it holds the connection until the
    stream timeout (60 s). ``proxy_socket_keepalive on`` (the default) lets the kernel
    find it dead, on the system's keepalive timing, lowered here on nginx's host (2 s
    idle, 2 probes 1 s apart: the README's advice, scaled down): the client sees its
    WebSocket end and can reconnect. Rendered without it, the same WebSocket stays open."""
    ns = cluster.net.ns["client"]
    for key, value in (("time", 2), ("intvl", 1), ("probes", 2)):
        path = f"/proc/sys/net/ipv4/tcp_keepalive_{key}"  # per network namespace
        _ip("netns", "exec", ns, "sh", "-c", f"echo {value} > {path}")
    with inside(ns):
        assert Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text().strip() == "2"
        east = [f"{h}:{p}" for h, p in cluster.worker_ports()[:2]]
        clients = {}
        with contextlib.ExitStack() as stack:
            for keepalive, listen in zip((True, False), WS_NGINX_PORTS, strict=True):
                conf = render(east, listen, "127.0.0.1", default_server=False,
                              failover=Failover(socket_keepalive=keepalive))
                assert ("proxy_socket_keepalive on;" in conf) is keepalive
                stack.enter_context(nginx_site(conf, listen))
                clients[keepalive] = RawClient(f"ws://127.0.0.1:{listen}/ws")
                stack.callback(clients[keepalive].close)
            assert {c.instance for c in clients.values()} == {"east"}
            cut = time.monotonic()
            cluster.net.link("east", up=False)
            assert clients[True].ended(timeout=20), "nginx kept the WebSocket to a vanished host"
            ended = time.monotonic() - cut
            assert not clients[False].ended(timeout=3)  # nothing told this one
            print(f"WebSocket to a vanished host: ended {ended:.1f}s after the cut with TCP "
                  "keepalive (2 s idle, 2 probes 1 s apart); still open "
                  f"{time.monotonic() - cut:.1f}s after it without")
