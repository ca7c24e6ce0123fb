"""Sticky routing with real parts: real nginx, two real Gunicorn instances, real HTTP clients.

The nginx config is written here by hand (not by the renderer) so the test pins down the
mechanism itself: a whitelist ``map`` from the ``gx_route`` cookie to named upstreams,
``default`` -> the pool, and ``backup`` servers so a pinned-but-dead backend falls over
to the other one, which re-pins the client (:class:`gunicorn_ext.sticky.RouteCookie`).

Then the setting: ``gunicorn_ext.enable(..., sticky=..., sticky_cookie=...)`` puts the
route cookie around any WSGI app from the worker hooks (here a bare WSGI function with
no sticky code; the example behind nginx is in test_socketio_nginx.py and test_chat.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import (
    Gunicorn,
    find_binary,
    free_port,
    free_port_pair,
    running_nginx,
    serves,
    wait_for,
)

from gunicorn_ext.settings import Settings, SettingsError
from gunicorn_ext.sticky import (
    ROUTE_RE,
    AsgiRouteCookie,
    RouteCookie,
    default_route,
    instance_route,
    read_cookie,
    route_name,
)

APPS = Path(__file__).resolve().parent / "apps"
TIMEOUT = 5.0
PIN_A = "gx_route=a; Path=/; HttpOnly; SameSite=Lax"
PIN_B = "gx_route=b; Path=/; HttpOnly; SameSite=Lax"
PINS = {"a": PIN_A, "b": PIN_B}
ADDR_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+)")

NGINX_CONF = """\
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 128; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format gx '$upstream_addr|$gx_backend|$status|$cookie_gx_route';
    access_log {tmp}/access.log gx;

    upstream pool {{
        server 127.0.0.1:{a} max_fails=1 fail_timeout=5s;
        server 127.0.0.1:{b} max_fails=1 fail_timeout=5s;
    }}
    upstream gx_a {{ server 127.0.0.1:{a}; server 127.0.0.1:{b} backup; }}
    upstream gx_b {{ server 127.0.0.1:{b}; server 127.0.0.1:{a} backup; }}

    # Whitelist: only known route names select a pinned upstream; anything else -> pool.
    map $cookie_gx_route $gx_backend {{
        default pool;
        a       gx_a;
        b       gx_b;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://$gx_backend;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 2s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"""


@dataclass
class Cluster:
    """Two Gunicorn instances (routes ``a`` and ``b``) behind one nginx."""

    a: Gunicorn
    b: Gunicorn
    port: int
    tmp: Path

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def instance(self, route: str) -> Gunicorn:
        return {"a": self.a, "b": self.b}[route]

    def other(self, route: str) -> str:
        return {"a": "b", "b": "a"}[route]

    @property
    def backend_ports(self) -> set[int]:
        return {self.a.port, self.b.port}

    def access_lines(self, expect: int = 0, timeout: float = 5.0) -> list[list[str]]:
        """Parsed access-log lines; waits (bounded) for at least *expect* of them, since
        nginx writes the line just after the client already has the response."""
        path = self.tmp / "access.log"
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text() if path.exists() else ""
            lines = [line.split("|") for line in text.splitlines() if line]
            if len(lines) >= expect or time.monotonic() >= deadline:
                return lines
            time.sleep(0.02)

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def assert_only_listed_backends(self, expect: int = 1) -> None:
        """nginx never contacted (or tried to resolve) anything but the two backends."""
        contacted = {int(p) for line in self.access_lines(expect) for _, p in ADDR_RE.findall(line[0])}
        assert contacted and contacted <= self.backend_ports, (contacted, self.backend_ports)
        log = self.error_log()
        upstreams = {int(p) for p in re.findall(r'upstream: "http://127\.0\.0\.1:(\d+)', log)}
        assert upstreams <= self.backend_ports, log
        for bad in ("could not be resolved", "no resolver defined", "invalid port", "invalid host"):
            assert bad not in log, log
        # Every upstream address logged at all (connect() failures name it) is a backend.
        addrs = {int(p) for _, p in ADDR_RE.findall(log) if _ == "127.0.0.1"}
        assert addrs <= self.backend_ports | {self.port}, log


@pytest.fixture
def cluster(gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path) -> Iterator[Cluster]:
    if find_binary("nginx") is None:
        pytest.fail("nginx is not installed (apt-get install nginx)", pytrace=False)
    a = gunicorn_factory("sticky_app:app", cwd=APPS, workers=2, env={"GX_ROUTE": "a"}, name="gunicorn-a")
    b = gunicorn_factory("sticky_app:app", cwd=APPS, workers=2, env={"GX_ROUTE": "b"}, name="gunicorn-b")
    a.wait_workers(2)
    b.wait_workers(2)
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    port = free_port()
    # As root, nginx workers would switch to "nobody", who cannot enter pytest's 0700 tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, a=a.port, b=b.port, port=port, user=user))
    with running_nginx(conf, port):
        yield Cluster(a=a, b=b, port=port, tmp=tmp)


def _get(session: requests.Session | None, url: str, **kw: Any) -> requests.Response:
    resp = (session or requests).get(url, timeout=TIMEOUT, allow_redirects=False, **kw)
    assert resp.status_code == 200, (resp.status_code, resp.text[:500])
    return resp


# -- (a) a new client gets pinned and stays ------------------------------------------------


def test_new_client_is_pinned_and_stays(cluster: Cluster) -> None:
    with requests.Session() as client:
        first = _get(client, cluster.url())
        route = first.json()["route"]
        assert route in ("a", "b")
        assert first.headers.get("Set-Cookie") == PINS[route]
        assert client.cookies.get("gx_route") == route

        deadline = time.monotonic() + 30
        pids = set()
        for _ in range(50):
            assert time.monotonic() < deadline
            resp = _get(client, cluster.url())
            body = resp.json()
            assert body["route"] == route
            assert body["cookie"] == route
            assert "Set-Cookie" not in resp.headers  # no churn once pinned
            pids.add(body["pid"])
        assert pids <= set(cluster.instance(route).worker_pids()) | {first.json()["pid"]}

    # Fresh clients are balanced by the pool, so stickiness is doing real work above.
    seen = {_get(None, cluster.url()).json()["route"] for _ in range(6)}
    assert seen == {"a", "b"}
    cluster.assert_only_listed_backends(expect=57)


# -- (b) forged cookies never reach an unlisted address ------------------------------------

FORGED = ["127.0.0.1:22", "evil", "x" * 3000, "gx_a", "pool", "127_0_0_1_22", '"a;b"', "A b", ""]


@pytest.mark.parametrize("value", FORGED, ids=lambda v: v[:20] or "empty")
def test_forged_cookie_goes_to_pool_and_is_repinned(cluster: Cluster, value: str) -> None:
    routes = set()
    for _ in range(4):
        resp = _get(None, cluster.url(), headers={"Cookie": f"gx_route={value}"})
        route = resp.json()["route"]
        assert route in ("a", "b")
        assert resp.headers.get("Set-Cookie") == PINS[route]  # re-pinned with a valid route
        routes.add(route)
    assert routes == {"a", "b"}  # round-robin pool: the forged value selected nothing
    lines = cluster.access_lines(expect=4)
    assert len(lines) == 4 and all(line[1] == "pool" for line in lines), lines
    cluster.assert_only_listed_backends()


def test_cookie_header_split_on_semicolon_pins_first_value(cluster: Cluster) -> None:
    """``gx_route=a;b`` is cookie ``gx_route=a`` plus a cookie ``b`` for nginx and the app."""
    for _ in range(4):
        resp = _get(None, cluster.url(), headers={"Cookie": "gx_route=a;b"})
        assert resp.json()["route"] == "a"
        assert "Set-Cookie" not in resp.headers
    lines = cluster.access_lines(expect=4)
    assert len(lines) == 4 and all(line[1] == "gx_a" for line in lines), lines
    cluster.assert_only_listed_backends()


# -- (c) failover: the pinned instance dies, the other one answers and re-pins -------------


def test_failover_repins_to_surviving_instance(cluster: Cluster) -> None:
    with requests.Session() as client:
        first = _get(client, cluster.url())
        pinned = first.json()["route"]
        survivor = cluster.other(pinned)
        for _ in range(5):
            assert _get(client, cluster.url()).json()["route"] == pinned

        cluster.instance(pinned).stop()
        assert not cluster.instance(pinned).alive()

        resp = _get(client, cluster.url())
        assert resp.json()["route"] == survivor
        assert resp.json()["cookie"] == pinned  # it arrived pinned to the dead one...
        assert resp.headers.get("Set-Cookie") == PINS[survivor]  # ...and was re-pinned
        assert client.cookies.get("gx_route") == survivor

        deadline = time.monotonic() + 30
        for _ in range(20):
            assert time.monotonic() < deadline
            resp = _get(client, cluster.url())
            assert resp.json()["route"] == survivor
            assert "Set-Cookie" not in resp.headers
    # The failover request was mapped to the dead backend's upstream, tried it, then its backup.
    lines = cluster.access_lines(expect=27)
    assert len(lines) == 27, lines
    dead, alive = cluster.instance(pinned).port, cluster.instance(survivor).port
    assert lines[6][:3] == [f"127.0.0.1:{dead}, 127.0.0.1:{alive}", f"gx_{pinned}", "200"], lines[6]
    assert all(line[1] == f"gx_{survivor}" and line[0] == f"127.0.0.1:{alive}" for line in lines[7:])
    assert re.search(rf'connect\(\) failed .*upstream: "http://127\.0\.0\.1:{dead}/"', cluster.error_log())
    cluster.assert_only_listed_backends(expect=27)


# -- (d) unit tests of the middleware ------------------------------------------------------


def _echo_app(extra: list[tuple[str, str]] | None = None) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), *(extra or [])])
        return [b"ok"]

    return app


def _call(mw: RouteCookie, cookie: str | None = None) -> list[tuple[str, str]]:
    captured: list[list[tuple[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.append(headers)
        return lambda data: None

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    assert b"".join(mw(environ, start_response)) == b"ok"
    return captured[0]


def _set_cookies(headers: list[tuple[str, str]]) -> list[str]:
    return [v for k, v in headers if k.lower() == "set-cookie"]


def test_no_set_cookie_when_cookie_matches() -> None:
    mw = RouteCookie(_echo_app(), route="a")
    assert _set_cookies(_call(mw, "gx_route=a")) == []
    assert _set_cookies(_call(mw, "other=1; gx_route=a; x=y")) == []
    assert _set_cookies(_call(mw, 'gx_route="a"')) == []


@pytest.mark.parametrize("cookie", [None, "", "gx_route=b", "gx_route=", "gx_route=ab", "x=a", "gx_route=A"])
def test_set_cookie_when_missing_or_other(cookie: str | None) -> None:
    mw = RouteCookie(_echo_app(), route="a")
    assert _set_cookies(_call(mw, cookie)) == [PIN_A]


def test_first_cookie_occurrence_wins_like_nginx() -> None:
    mw = RouteCookie(_echo_app(), route="a")
    assert _set_cookies(_call(mw, "gx_route=a; gx_route=b")) == []
    assert _set_cookies(_call(mw, "gx_route=b; gx_route=a")) == [PIN_A]
    assert read_cookie("gx_route=a;b", "gx_route") == "a"
    assert read_cookie("foo_gx_route=a", "gx_route") is None


def test_cookie_flags_and_name() -> None:
    mw = RouteCookie(_echo_app(), route="h_10_0_0_1_80", cookie_name="r", secure=True, max_age=3600)
    assert _set_cookies(_call(mw)) == ["r=h_10_0_0_1_80; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"]
    assert _set_cookies(_call(mw, "r=h_10_0_0_1_80")) == []


def test_app_cookie_of_same_name_is_not_duplicated() -> None:
    mw = RouteCookie(_echo_app([("Set-Cookie", "gx_route=z; Path=/")]), route="a")
    assert _set_cookies(_call(mw)) == ["gx_route=z; Path=/"]
    other = RouteCookie(_echo_app([("Set-Cookie", "session=1")]), route="a")
    assert _set_cookies(_call(other)) == ["session=1", PIN_A]


@pytest.mark.parametrize("bad", ["", "A", "a-b", "a;b", "a b", "127.0.0.1:22", "é", "x" * 65])
def test_route_validation(bad: str) -> None:
    with pytest.raises(ValueError):
        RouteCookie(_echo_app(), route=bad)


def test_other_argument_validation() -> None:
    for name in ("bad name", "gx-route", "", "x" * 65, "a;b"):  # nginx: $cookie_<[A-Za-z0-9_]>
        with pytest.raises(ValueError):
            RouteCookie(_echo_app(), route="a", cookie_name=name)
    with pytest.raises(ValueError):
        RouteCookie(_echo_app(), route="a", secure="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RouteCookie(_echo_app(), route="a", max_age=-1)
    RouteCookie(_echo_app(), route="x" * 64)


def test_route_name() -> None:
    assert route_name("127.0.0.1:8000") == "127_0_0_1_8000"
    assert route_name("LocalHost:80") == "localhost_80"
    assert route_name("[::1]:8000") == "___1__8000"
    assert ROUTE_RE.match(route_name("unix:/run/app.sock"))
    for bad in ("", "  ", "x" * 65):
        with pytest.raises(ValueError):
            route_name(bad)


def test_default_route_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_route({"GX_ROUTE": "a", "BIND": "127.0.0.1:1"}) == "a"
    assert default_route({"INSTANCE": "127.0.0.1:9000", "BIND": "127.0.0.1:1"}) == "127_0_0_1_9000"
    assert default_route({"BIND": "127.0.0.1:8001,127.0.0.1:8002"}) == "127_0_0_1_8001"
    with pytest.raises(ValueError):
        default_route({})
    for var in ("GX_ROUTE", "INSTANCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BIND", "127.0.0.1:8000")
    assert RouteCookie(_echo_app()).route == "127_0_0_1_8000"
    monkeypatch.setenv("GX_ROUTE", "Bad-Route")
    with pytest.raises(ValueError):
        RouteCookie(_echo_app())


def test_flask_wsgi_app_wrapping() -> None:
    from flask import Flask

    app = Flask("t")
    app.wsgi_app = RouteCookie(app.wsgi_app, route="a")  # type: ignore[method-assign]

    @app.get("/")
    def index() -> str:
        return "hi"

    client = app.test_client()
    assert client.get("/").headers.getlist("Set-Cookie") == [PIN_A]
    assert client.get("/").headers.getlist("Set-Cookie") == []  # test client kept the cookie


def _call_env(mw: Any, environ: dict[str, Any]) -> list[str]:
    captured: list[list[tuple[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.append(headers)
        return lambda data: None

    assert b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/", **environ}, start_response)) == b"ok"
    return _set_cookies(captured[0])


def test_secure_follows_the_request_scheme_by_default() -> None:
    mw = RouteCookie(_echo_app(), route="a")
    assert _call_env(mw, {"wsgi.url_scheme": "http"}) == [PIN_A]
    assert _call_env(mw, {"wsgi.url_scheme": "https"}) == [PIN_A + "; Secure"]
    never = RouteCookie(_echo_app(), route="a", secure=False)
    assert _call_env(never, {"wsgi.url_scheme": "https"}) == [PIN_A]


def test_nested_route_cookies_pin_once_the_innermost_wins() -> None:
    # The worker hooks' RouteCookie around an app that wraps itself in its own: one
    # cookie, the app's, whatever each of them would decide alone.
    outer = RouteCookie(RouteCookie(_echo_app(), route="inner"), route="outer")
    assert _call_env(outer, {}) == ["gx_route=inner; Path=/; HttpOnly; SameSite=Lax"]
    assert _call_env(outer, {"HTTP_COOKIE": "gx_route=inner"}) == []  # outer would re-pin
    assert _call_env(outer, {"HTTP_COOKIE": "gx_route=outer"}) == [
        "gx_route=inner; Path=/; HttpOnly; SameSite=Lax"]
    same = RouteCookie(RouteCookie(_echo_app(), route="a"), route="a")
    assert _call_env(same, {}) == [PIN_A]


def test_instance_route_from_the_bind() -> None:
    assert instance_route(["127.0.0.1:8000"], {}) == "127_0_0_1_8000"
    assert instance_route(["10.0.0.5:8000", "unix:/x"], {}) == "10_0_0_5_8000"
    assert instance_route(["127.0.0.1:8000"], {"GX_ROUTE": "blue"}) == "blue"
    host = route_name(f"{socket.gethostname()}:8000")
    assert instance_route(["0.0.0.0:8000"], {}) == host  # a wildcard is this machine
    assert instance_route(["[::]:8000"], {}) == host
    for bind, env in (([], {}), (["127.0.0.1:1"], {"GX_ROUTE": "Bad-Route"}),
                      (["unix:/" + "x" * 80], {})):
        with pytest.raises(ValueError):
            instance_route(bind, env)


def test_sticky_settings_are_validated() -> None:
    assert Settings().sticky is None and not Settings().sticky_on  # no per-worker ports
    assert Settings(worker_ports_base=9000).sticky_on
    assert not Settings(worker_ports_base=9000, sticky=False).sticky_on
    assert Settings(sticky=True).sticky_on
    assert Settings(sticky_cookie="route_2").sticky_cookie == "route_2"
    for bad in ({"sticky": "yes"}, {"sticky": 1}, {"sticky_cookie": "gx-route"},
                {"sticky_cookie": ""}, {"sticky_cookie": 5}, {"sticky_cookie": "a b"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_kwargs(bad)


# -- (e) the setting: the worker hooks pin any WSGI app ------------------------------------

PLAIN_APP = """\
import asyncio
import os


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

OWN_COOKIE_APP = """\
from gunicorn_ext.sticky import RouteCookie
from plain_app import app as plain

app = RouteCookie(plain, route="mine")
"""

CONF = """\
import asyncio
import os
import gunicorn_ext

bind = os.environ["BIND"]
workers = int(os.environ["WORKERS"])
gunicorn_ext.enable(globals(), {settings})
"""


def _serve(factory: Callable[..., Gunicorn], tmp_path: Path, app: str, settings: str,
           workers: int = 1, env: dict[str, str] | None = None) -> Gunicorn:
    (tmp_path / "plain_app.py").write_text(PLAIN_APP)
    (tmp_path / "own_cookie_app.py").write_text(OWN_COOKIE_APP)
    conf = tmp_path / f"conf_{abs(hash(settings))}.py"
    conf.write_text(CONF.format(settings=settings))
    g = factory(app, config=conf, cwd=tmp_path, workers=workers, health_path="/", env=env)
    g.wait_workers(workers)
    return g


def _pins(url: str, cookie: str | None = None) -> list[str]:
    headers = {"Connection": "close", **({"Cookie": cookie} if cookie else {})}
    resp = requests.get(url, headers=headers, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp.raw.headers.getlist("Set-Cookie")


def _pin(route: str, name: str = "gx_route") -> str:
    return f"{name}={route}; Path=/; HttpOnly; SameSite=Lax"


def test_per_worker_ports_pin_a_plain_wsgi_app_to_each_worker(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path) -> None:
    base = free_port_pair()
    g = _serve(gunicorn_factory, tmp_path, "plain_app:app", f"worker_ports_base={base}",
               workers=2)
    wait_for(lambda: serves(base, "/") and serves(base + 1, "/"), 15, what="worker ports")
    for port in (base, base + 1):
        route = route_name(f"127.0.0.1:{port}")
        assert _pins(f"http://127.0.0.1:{port}/") == [_pin(route)]
        assert _pins(f"http://127.0.0.1:{port}/", f"gx_route={route}") == []  # pinned: no churn
        assert _pins(f"http://127.0.0.1:{port}/", "gx_route=127_0_0_1_1") == [_pin(route)]
    # The shared port pins to the port of whichever worker answered.
    worker_routes = {route_name(f"127.0.0.1:{p}") for p in (base, base + 1)}
    assert {c.split(";")[0].split("=")[1] for c in _pins(g.url("/"))} <= worker_routes
    assert g.log_text().count("pins its clients with the cookie gx_route=") == 2


def test_sticky_false_sets_no_cookie(gunicorn_factory: Callable[..., Gunicorn],
                                     tmp_path: Path) -> None:
    base = free_port_pair()
    _serve(gunicorn_factory, tmp_path, "plain_app:app",
           f"worker_ports_base={base}, sticky=False")
    wait_for(lambda: serves(base, "/"), 15, what="the worker port")
    assert _pins(f"http://127.0.0.1:{base}/") == []


def test_sticky_true_without_worker_ports_names_the_instance_under_a_renamed_cookie(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path) -> None:
    g = _serve(gunicorn_factory, tmp_path, "plain_app:app", "sticky=True, sticky_cookie='rt'")
    route = route_name(g.bind)
    assert _pins(g.url("/")) == [_pin(route, "rt")]
    assert _pins(g.url("/"), f"rt={route}") == []
    assert _pins(g.url("/"), f"gx_route={route}") == [_pin(route, "rt")]


def test_an_app_with_its_own_route_cookie_is_pinned_once(
        gunicorn_factory: Callable[..., Gunicorn], tmp_path: Path) -> None:
    base = free_port_pair()
    _serve(gunicorn_factory, tmp_path, "own_cookie_app:app", f"worker_ports_base={base}")
    wait_for(lambda: serves(base, "/"), 15, what="the worker port")
    url = f"http://127.0.0.1:{base}/"
    assert _pins(url) == [_pin("mine")]  # the app's, not also the worker port's
    assert _pins(url, "gx_route=mine") == []


def test_a_bad_sticky_setting_stops_gunicorn_at_startup(tmp_path: Path) -> None:
    (tmp_path / "plain_app.py").write_text(PLAIN_APP)
    conf = tmp_path / "bad_conf.py"
    conf.write_text("import gunicorn_ext\nbind = '127.0.0.1:0'\n"
                    "gunicorn_ext.enable(globals(), sticky_cookie='gx-route')\n")
    r = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(conf), "--chdir",
                        str(tmp_path), "plain_app:app"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "sticky_cookie must be 1-64 characters of [A-Za-z0-9_]" in r.stderr, r.stderr[-2000:]


def test_rendered_nginx_reads_the_renamed_cookie() -> None:
    from gunicorn_ext.nginx import render

    conf = render(["127.0.0.1:9000", "127.0.0.1:9001"], 8080, "example.com", cookie="route")
    assert "map $cookie_route $gx_backend {" in conf and "gx_route" not in conf
    assert "map $cookie_gx_route $gx_backend {" in render(["127.0.0.1:9000"], 8080, "example.com")
    for bad in ("gx-route", "", "a b", "x;", "x" * 65):
        with pytest.raises(ValueError, match="cookie"):
            render(["127.0.0.1:9000"], 8080, "example.com", cookie=bad)


def test_pin_worker_wraps_the_wsgi_app_and_says_so_for_other_workers() -> None:
    import logging
    from types import SimpleNamespace

    from gunicorn_ext.sticky import pin_worker

    log = logging.getLogger("test.sticky")
    worker = SimpleNamespace(wsgi=_echo_app(), log=log)
    assert pin_worker(worker, "a") is True
    assert isinstance(worker.wsgi, RouteCookie) and worker.wsgi.route == "a"
    assert _call(worker.wsgi) == [("Content-Type", "text/plain"), ("Set-Cookie", PIN_A)]
    asgi = SimpleNamespace(asgi=_asgi_echo, log=log)  # Gunicorn's ASGI worker: no .wsgi
    assert pin_worker(asgi, "a") is True and not hasattr(asgi, "wsgi")
    assert isinstance(asgi.asgi, AsgiRouteCookie) and asgi.asgi.route == "a"
    neither = SimpleNamespace(log=log)  # serves no app at all
    assert pin_worker(neither, "a") is False


async def _asgi_echo(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/plain")]
    if scope.get("path") == "/own":
        headers.append((b"set-cookie", b"gx_route=own; Path=/"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _asgi_call(app: Any, cookie: str | None = None, path: str = "/",
               scheme: str = "http") -> list[tuple[bytes, bytes]]:
    import asyncio

    headers = [(b"cookie", cookie.encode())] if cookie is not None else []
    scope = {"type": "http", "path": path, "scheme": scheme, "headers": headers}
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return list(sent[0]["headers"])


def test_asgi_route_cookie_pins_like_the_wsgi_one() -> None:
    app = AsgiRouteCookie(_asgi_echo, route="a")
    assert (b"set-cookie", PIN_A.encode()) in _asgi_call(app)
    assert _asgi_call(app, cookie="gx_route=a") == [(b"content-type", b"text/plain")]  # no churn
    assert (b"set-cookie", PIN_A.encode()) in _asgi_call(app, cookie="x=1; gx_route=b")  # re-pin
    secure = _asgi_call(app, scheme="https")
    assert (b"set-cookie", (PIN_A + "; Secure").encode()) in secure
    own = _asgi_call(app, path="/own")  # the app set the cookie itself: left alone
    assert [v for k, v in own if k == b"set-cookie"] == [b"gx_route=own; Path=/"]
    nested = AsgiRouteCookie(AsgiRouteCookie(_asgi_echo, route="inner"), route="a")
    cookies = [v for k, v in _asgi_call(nested) if k == b"set-cookie"]
    assert len(cookies) == 1 and cookies[0].startswith(b"gx_route=inner;")  # innermost pins
    for bad in ("A", "a b", "x" * 65):
        with pytest.raises(ValueError):
            AsgiRouteCookie(_asgi_echo, route=bad)


def test_nginx_render_cli_takes_the_cookie_name(capsys: pytest.CaptureFixture[str]) -> None:
    from gunicorn_ext.cli import main

    base = ["nginx", "render", "--backend", "127.0.0.1:9000", "--listen", "8080",
            "--server-name", "example.com"]
    assert main([*base, "--cookie", "route"]) == 0
    assert "map $cookie_route $gx_backend {" in capsys.readouterr().out
    assert main([*base, "--cookie", "gx-route"]) == 2
    assert "cookie 'gx-route': expected 1-64 characters of [A-Za-z0-9_]" in capsys.readouterr().err


def test_the_fast_path_for_a_pinned_client_judges_as_the_full_parse() -> None:
    # The middleware compares the header with "gx_route=<route>" (alone, or first before a
    # ";") before parsing it; every other header takes read_cookie, as nginx reads it.
    mw = RouteCookie(_echo_app(), route="a")
    for cookie in ("gx_route=a", "gx_route=a;gx_route=b", "gx_route=a; x=1", "gx_route=a ; x=1",
                   " gx_route=a", "x=1;gx_route=a"):
        assert _set_cookies(_call(mw, cookie)) == [], cookie
    for cookie in ("gx_route=ab", "gx_route=ab; x=1", "gx_route=a_", "gx_route=b;gx_route=a",
                   "xgx_route=a", "gx_route"):
        assert _set_cookies(_call(mw, cookie)) == [PIN_A], cookie


def test_the_asgi_fast_path_reads_every_cookie_header() -> None:
    app = AsgiRouteCookie(_asgi_echo, route="a")
    pin = (b"set-cookie", PIN_A.encode())

    def call(*cookies: tuple[bytes, bytes]) -> list[Any]:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request"}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/", "scheme": "http", "headers": list(cookies)}
        asyncio.run(app(scope, receive, send))
        return list(sent[0]["headers"])

    assert pin not in call((b"cookie", b"gx_route=a; x=1"))
    assert pin not in call((b"Cookie", b"gx_route=a"))  # a server that keeps the case
    assert pin not in call((b"cookie", b"x=1"), (b"cookie", b"gx_route=a"))  # HTTP/2 style
    assert pin in call((b"cookie", b"x=1"), (b"cookie", b"gx_route=b"))
    assert pin in call((b"cookie", b"gx_route=ab"))
    assert pin in call()
