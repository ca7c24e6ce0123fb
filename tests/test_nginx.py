"""nginx/ templates, `gunicorn-ext nginx render|check`, and a real nginx in front of Gunicorn."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_for

from gunicorn_ext import nginx as gx
from gunicorn_ext.cli import main

pytestmark = pytest.mark.nginx

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "nginx"
EXAMPLE = ROOT / "examples" / "flask_app"
SERVER_NAME = "app.test"

ECHO_APP = '''
import json, os

def app(environ, start_response):
    headers = {k[5:]: v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps({"bind": os.environ.get("BIND"), "path": environ["PATH_INFO"],
                       "headers": headers}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    found = gx.find_nginx()
    if found is None:
        pytest.fail("nginx is not installed (apt-get install nginx)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


# ------------------------------------------------------------------ templates


def test_gixy_is_installed() -> None:
    assert gx._gixy_cmd() is not None, "gixy-ng is not installed: pip install -e .[dev]"


def test_template_files_match_the_renderer() -> None:
    """nginx/ is rendered from the blocks of gunicorn_ext.nginx: one source of text."""
    on_disk = {p.name for p in TEMPLATES.glob("*.conf")}
    expected = gx.templates()
    assert on_disk == set(expected)
    for name, text in expected.items():
        assert (TEMPLATES / name).read_text() == text, f"nginx/{name} is out of date"


def _template(name: str, tmp_path: Path, cert: tuple[str, str]) -> str:
    text = (TEMPLATES / name).read_text()
    text = text.replace(gx.EXAMPLE_CERT, cert[0]).replace(gx.EXAMPLE_KEY, cert[1])
    out = tmp_path / name
    out.write_text(text)
    return str(out)


@pytest.mark.parametrize("name", ["gunicorn-ext.conf", "tls.conf", "default-server.conf"])
def test_each_template_passes_nginx_t_and_gixy(name: str, tmp_path: Path, cert: Any,
                                              nginx_bin: str) -> None:
    assert gx.check(_template(name, tmp_path, cert)) == []


@pytest.mark.parametrize("main_conf", ["gunicorn-ext.conf", "tls.conf"])
def test_templates_together(main_conf: str, tmp_path: Path, cert: Any, nginx_bin: str) -> None:
    path = _template(main_conf, tmp_path, cert)
    assert gx.check(path, extra=[_template("default-server.conf", tmp_path, cert)]) == []


@pytest.mark.parametrize("name", ["gunicorn-ext.conf", "tls.conf", "default-server.conf"])
def test_gixy_cli_directly_reports_nothing_medium_or_high(name: str, tmp_path: Path,
                                                         cert: Any) -> None:
    cmd = gx._gixy_cmd()
    assert cmd is not None
    (tmp_path / "nginx.conf").write_text(
        gx.wrapper_conf([_template(name, tmp_path, cert)], str(tmp_path)))
    proc = subprocess.run([*cmd, "-ll", "-f", "json", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=120)
    findings = [f for f in json.loads(proc.stdout or "[]")
                if not gx._gx_backend_only(f)]
    assert findings == [], proc.stdout


def test_templates_content() -> None:
    text = (TEMPLATES / "gunicorn-ext.conf").read_text()
    assert "upstream gunicorn_pool" in text and "max_fails=" in text and "keepalive" in text
    assert "map $http_upgrade $connection_upgrade" in text
    assert "map $cookie_gx_route $gx_backend" in text and "default gunicorn_pool;" in text
    # Retry only failed attempts, never on an app's status; never eject a backend.
    assert "proxy_next_upstream error timeout;" in text
    assert not re.search(r"^\s*proxy_next_upstream\s[^\n]*http_", text, re.M)
    servers = re.findall(r"^\s*server (\S+:\d+)([^;]*);", text, re.M)
    assert servers and all("max_fails=0" in opts for _, opts in servers), servers
    assert not re.search(r"^\s*proxy_next_upstream[^\n]*non_idempotent", text, re.M)
    assert "sticky learn" in text and "1.29.6" in text
    assert "#proxy_cache_path" in text and "#proxy_cache gx_cache;" in text
    assert "#limit_req_zone" in text and "#limit_req zone=gx_req" in text
    assert "location /socket.io/" in text
    # Failover timeouts (gunicorn_ext.nginx.Failover's defaults): a vanished host is seen
    # by a 1 s connect timeout; plain HTTP reads 30 s, WebSockets and long-polls 60 s.
    d = gx.Failover()
    server = text[text.index("\nserver {"):]
    assert "proxy_connect_timeout 1s;" in server
    assert server.index("proxy_read_timeout 30s;") < server.index("location / {")
    for loc in ("/socket.io/", "/ws"):
        block = server[server.index(f"location {loc} {{"):]
        block = block[:block.index("}")]
        assert "proxy_read_timeout 60s;" in block and "proxy_send_timeout 60s;" in block
    assert "proxy_next_upstream_tries 3;" in text and "proxy_next_upstream_timeout 10s;" in text
    assert "proxy_socket_keepalive on;" in text
    upstreams = re.findall(r"^upstream \S+ \{(.*?)^\}", text, re.M | re.S)
    assert upstreams and all("keepalive_timeout 1s;" in u for u in upstreams)
    assert d.connect_timeout == 1 and d.read_timeout == 30 and d.stream_timeout == 60
    assert "proxy_set_header Host $host;" in text
    # The only proxy targets are upstream names chosen by the whitelist map.
    assert set(re.findall(r"proxy_pass\s+([^;]+);", text)) == {"http://$gx_backend"}
    tls = (TEMPLATES / "tls.conf").read_text()
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in tls and "Strict-Transport-Security" in tls
    assert "return 301 https://" in tls
    assert "return 444;" in (TEMPLATES / "default-server.conf").read_text()


# ------------------------------------------------------------------- renderer


def test_render_default_routes_and_check(tmp_path: Path, nginx_bin: str) -> None:
    text = gx.render(["127.0.0.1:8000", "localhost:8001"], 8080, SERVER_NAME)
    assert '"127_0_0_1_8000" gx_127_0_0_1_8000;' in text
    assert '"localhost_8001" gx_localhost_8001;' in text
    assert "server 127.0.0.1:8001 backup" not in text  # only listed backends
    assert "server localhost:8001 backup max_fails=0;" in text
    conf = tmp_path / "r.conf"
    conf.write_text(text)
    assert gx.check(str(conf)) == []


def test_render_tls_and_routes_via_cli(tmp_path: Path, cert: Any, nginx_bin: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["nginx", "render", "--backend", "127.0.0.1:8000", "--backend", "127.0.0.1:8001",
               "--route", "a0", "--route", "b1", "--listen", "8443", "--http-port", "8080",
               "--server-name", SERVER_NAME, "--tls-cert", cert[0], "--tls-key", cert[1]])
    out = capsys.readouterr().out
    assert rc == 0
    assert '"a0" gx_a0;' in out and '"b1" gx_b1;' in out
    assert "listen 8443 ssl;" in out and "return 301 https://$host:8443$request_uri;" in out
    conf = tmp_path / "tls.conf"
    conf.write_text(out)
    assert main(["nginx", "check", str(conf)]) == 0
    bad = tmp_path / "bad.conf"
    bad.write_text("server { listen 8080; location / { proxy_pass http://nowhere.invalid; }\n")
    assert main(["nginx", "check", str(bad)]) == 1
    assert "nginx:" in capsys.readouterr().out


def test_failover_defaults_hold_their_reasons() -> None:
    """The reasons written beside each default, checked against the libraries' own."""
    import inspect

    import engineio
    import gunicorn.config

    d = gx.Failover()
    # Every connect timeout of a request's retries fits before the retries stop, and a
    # read timeout comes after that: it is a 504, never replayed on another backend.
    assert (d.next_upstream_tries - 1) * d.connect_timeout < d.next_upstream_timeout
    assert d.next_upstream_timeout < d.read_timeout
    # Plain HTTP waits as long as Gunicorn lets a silent sync worker live.
    assert d.read_timeout == gunicorn.config.Timeout.default
    # A WebSocket or long-poll carries something every ping_interval: one may be late.
    params = inspect.signature(engineio.Server.__init__).parameters
    ping = params["ping_interval"].default
    assert d.stream_timeout >= ping + params["ping_timeout"].default + 10
    assert d.stream_timeout > 2 * ping
    chat = (EXAMPLE / "chat.py").read_text()
    assert d.stream_timeout > 2 * int(re.search(r"^PING_INTERVAL = (\d+)", chat, re.M).group(1))
    # nginx drops an idle upstream connection before Gunicorn would.
    assert d.idle_timeout < gunicorn.config.Keepalive.default
    assert d.max_fails == 0  # see test_a_killed_worker_is_retried_elsewhere_and_its_instance_stays


def test_render_failover_options_via_cli_and_check(tmp_path: Path, nginx_bin: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["nginx", "render", "--backend", "127.0.0.1:8000", "--backend", "127.0.0.1:8001",
               "--listen", "8080", "--server-name", SERVER_NAME, "--connect-timeout", "0.5",
               "--read-timeout", "12", "--stream-timeout", "120", "--next-upstream-tries", "5",
               "--next-upstream-timeout", "0", "--max-fails", "3", "--fail-timeout", "20",
               "--idle-timeout", "1.5", "--no-socket-keepalive"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "proxy_connect_timeout 500ms;" in out
    assert "proxy_read_timeout 12s;" in out and "proxy_send_timeout 12s;" in out
    assert out.count("proxy_read_timeout 120s;") == 2
    assert "proxy_next_upstream_tries 5;" in out and "proxy_next_upstream_timeout 0;" in out
    servers = re.findall(r"^\s*server (\S+:\d+)([^;]*);", out, re.M)
    assert len(servers) == 6 and all("max_fails=3 fail_timeout=20s" in o for _, o in servers)
    assert out.count("keepalive_timeout 1500ms;") == 3
    assert "proxy_socket_keepalive" not in out
    conf = tmp_path / "f.conf"
    conf.write_text(out)
    assert gx.check(str(conf)) == []
    # No option: the defaults, the same text as render() without a Failover.
    assert main(["nginx", "render", "--backend", "127.0.0.1:8000", "--listen", "8080",
                 "--server-name", SERVER_NAME]) == 0
    assert capsys.readouterr().out == gx.render(["127.0.0.1:8000"], 8080, SERVER_NAME)


@pytest.mark.parametrize("kw", [
    {"connect_timeout": 0}, {"connect_timeout": -1}, {"connect_timeout": "1s"},
    {"connect_timeout": True}, {"read_timeout": float("nan")}, {"read_timeout": 1e9},
    {"stream_timeout": 0.0001}, {"next_upstream_tries": -1}, {"next_upstream_tries": 1.5},
    {"max_fails": -1}, {"max_fails": "2"}, {"fail_timeout": 0}, {"idle_timeout": None},
    {"next_upstream_timeout": -1}, {"next_upstream_timeout": 0.5},  # <= connect_timeout
    {"socket_keepalive": "yes"},
])
def test_failover_refuses_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        gx.Failover(**kw)


def test_render_and_cli_refuse_bad_failover(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="failover"):
        gx.render(["127.0.0.1:8000"], 8080, SERVER_NAME, failover="fast")  # type: ignore[arg-type]
    base = ["nginx", "render", "--backend", "127.0.0.1:8000", "--listen", "8080",
            "--server-name", SERVER_NAME]
    assert main([*base, "--next-upstream-timeout", "0.5"]) == 2
    assert "longer than connect_timeout" in capsys.readouterr().err
    for bad in (["--read-timeout", "soon"], ["--max-fails", "-2"]):
        assert main([*base, *bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and f"argument {bad[0]}: expected" in captured.err


def test_check_reports_gixy_findings(tmp_path: Path, nginx_bin: str) -> None:
    conf = tmp_path / "spoof.conf"
    conf.write_text("server {\n listen 8080;\n server_name a.test;\n server_tokens off;\n"
                    " location / {\n  proxy_set_header Host $http_host;\n"
                    "  proxy_pass http://127.0.0.1:9;\n }\n}\n")
    problems = gx.check(str(conf))
    assert any("gixy" in p and "host_spoofing" in p for p in problems), problems


@pytest.mark.parametrize("kw", [
    {"server_name": "a; include /etc/passwd"},
    {"server_name": "a.test\nlisten 1"},
    {"server_name": "a{b}"},
    {"server_name": "$host"},
    {"server_name": ""},
    {"backends": ["1.2.3.4:80;"]},
    {"backends": ["1.2.3.4:80 backup"]},
    {"backends": ["1.2.3.4"]},
    {"backends": ["1.2.3.4:0"]},
    {"backends": ["1.2.3.4:65536"]},
    {"backends": ["1.2.3.4:80}"]},
    {"backends": ["$http_host:80"]},
    {"backends": ["a\n:80"]},
    {"backends": []},
    {"backends": ["127.0.0.1:80", "127.0.0.1:80"]},
    {"listen": 0},
    {"listen": 70000},
    {"route_names": ["x;y"]},
    {"route_names": ["UPPER"]},
    {"route_names": ["a", "b"]},
    {"tls_cert": "/x.pem"},
    {"tls_cert": "/x.pem;", "tls_key": "/k.pem"},
    {"tls_cert": "/x.pem", "tls_key": "/k.pem}"},
    {"tls_cert": "rel.pem", "tls_key": "/k.pem"},
])
def test_render_refuses_bad_input(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"backends": ["127.0.0.1:8000"], "listen": 8080,
                            "server_name": SERVER_NAME}
    args.update(kw)
    with pytest.raises(ValueError):
        gx.render(args.pop("backends"), args.pop("listen"), args.pop("server_name"), **args)


def test_cli_render_refuses_injection(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nginx", "render", "--backend", "127.0.0.1:80", "--listen", "8080",
                 "--server-name", "a; include /etc/passwd"]) == 2
    assert main(["nginx", "render", "--backend", "1.2.3.4:80;", "--listen", "8080",
                 "--server-name", SERVER_NAME]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "must not contain ';'" in captured.err


# --------------------------------------------------------------- real nginx


class Nginx:
    def __init__(self, binary: str, directory: Path, conf_text: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "site.conf").write_text(conf_text)
        user = "root" if os.geteuid() == 0 else None
        (self.dir / "nginx.conf").write_text(
            gx.wrapper_conf([str(self.dir / "site.conf")], str(self.dir), user=user,
                            access_log=True))
        self.cmd = [binary, "-p", f"{self.dir}/", "-e", "stderr", "-c",
                    str(self.dir / "nginx.conf"), "-g", "daemon off;"]
        self.log = open(self.dir / "stderr.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the master; its workers exit when it is gone
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def nginx_factory(nginx_bin: str, tmp_path: Path) -> Iterator[Callable[..., tuple[Nginx, int]]]:
    started: list[Nginx] = []

    def start(backends: list[str], **kw: Any) -> tuple[Nginx, int]:
        port = free_port()
        text = gx.render(backends, port, SERVER_NAME, **kw)
        text = re.sub(r"listen (\d+)", r"listen 127.0.0.1:\1", text)  # loopback only
        server = Nginx(nginx_bin, tmp_path / f"nginx-{len(started)}", text)
        started.append(server)

        def up() -> bool:
            assert server.proc.poll() is None, (server.dir / "stderr.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 10, what="nginx listening")
        return server, port

    yield start
    for server in started:
        try:
            os.killpg(server.proc.pid, 9)
        except ProcessLookupError:
            pass
        server.stop()


def _get(port: int, path: str, headers: dict[str, str] | None = None,
         host: str = SERVER_NAME) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def echo_app(tmp_path: Path) -> Path:
    d = tmp_path / "echo"
    d.mkdir()
    (d / "echo_app.py").write_text(ECHO_APP)
    return d


def test_real_nginx_in_front_of_the_example_app(gunicorn_factory: Any,
                                                nginx_factory: Any) -> None:
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2)
    _, port = nginx_factory([g.bind])
    status, headers, body = _get(port, "/whoami")
    assert status == 200, body
    data = json.loads(body)
    assert data["pid"] > 0 and "slot" in data
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["server"] == "nginx"  # server_tokens off: no version
    assert _get(port, "/healthz")[0] == 200

    # An unknown Host reaches the default server: 444, the connection closes unanswered.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
        assert s.recv(65536) == b""
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        _get(port, "/whoami", host="evil.test")


def test_real_nginx_upgrade_and_forwarded_headers(gunicorn_factory: Any, nginx_factory: Any,
                                                  echo_app: Path) -> None:
    g = gunicorn_factory("echo_app:app", cwd=echo_app)
    _, port = nginx_factory([g.bind])
    ws = {"Upgrade": "websocket", "Connection": "Upgrade", "X-Forwarded-For": "6.6.6.6"}
    for path in ("/ws", "/socket.io/?EIO=4&transport=websocket"):
        status, headers, body = _get(port, path, ws)
        assert status == 200, body
        seen = json.loads(body)["headers"]
        assert seen["UPGRADE"] == "websocket"
        assert seen["CONNECTION"] == "upgrade"
        assert headers["x-content-type-options"] == "nosniff"
    # Plain HTTP: keepalive to the backend, no upgrade; forwarded headers from nginx only.
    status, _, body = _get(port, "/plain", ws)
    seen = json.loads(body)["headers"]
    assert "CONNECTION" not in seen and "UPGRADE" not in seen
    assert seen["X_FORWARDED_FOR"] == "127.0.0.1"  # the client's 6.6.6.6 is not trusted
    assert seen["X_FORWARDED_PROTO"] == "http"
    assert seen["X_FORWARDED_HOST"] == SERVER_NAME and seen["HOST"] == SERVER_NAME


def test_real_nginx_route_cookie_whitelist_and_fallback(gunicorn_factory: Any,
                                                        nginx_factory: Any,
                                                        echo_app: Path) -> None:
    a = gunicorn_factory("echo_app:app", cwd=echo_app, name="a")
    b = gunicorn_factory("echo_app:app", cwd=echo_app, name="b")
    _, port = nginx_factory([a.bind, b.bind])

    def served_by(cookie: str | None) -> str:
        headers = {"Cookie": f"gx_route={cookie}"} if cookie is not None else {}
        status, _, body = _get(port, "/", headers)
        assert status == 200, body
        return str(json.loads(body)["bind"])

    for backend in (a, b):
        assert {served_by(gx.route_name(backend.bind)) for _ in range(6)} == {backend.bind}
    # No cookie, unknown or forged values (even an address): the pool, never elsewhere.
    pool = {served_by(c) for c in (None, "nope", "127.0.0.1:1", "gx_evil", "") for _ in range(4)}
    assert pool <= {a.bind, b.bind} and len(pool) == 2
    # The pinned backend is down: its named upstream falls back to the other one.
    b.stop()
    assert {served_by(gx.route_name(b.bind)) for _ in range(4)} == {a.bind}


# ------------------------------------------------------- faults through nginx

FAULT_APP = '''
import json, os, signal, sys

def app(environ, start_response):
    method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    print(f"seen {method} {path}", file=sys.stderr, flush=True)
    faulty = os.environ.get("FAULTY") == "1"
    if faulty and path == "/die":
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies with this request in flight
    status, extra = "200 OK", []
    if faulty and path == "/dep":  # a dependency of this backend is down: an answer
        status, extra = "503 Service Unavailable", [("Retry-After", "5")]
    body = json.dumps({"bind": os.environ["BIND"], "pid": os.getpid()}).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))] + extra)
    return [body]
'''


@pytest.fixture
def faulty_pair(gunicorn_factory: Any, nginx_factory: Any,
                tmp_path: Path) -> tuple[Any, Any, int, dict[str, str]]:
    """Backend A (3 sync workers, FAULTY: /die kills its worker, /dep answers 503) and a
    healthy B behind the rendered nginx; returns (a, b, nginx port, A's cookie header)."""
    d = tmp_path / "fault"
    d.mkdir()
    (d / "fault_app.py").write_text(FAULT_APP)
    a = gunicorn_factory("fault_app:app", cwd=d, workers=3, env={"FAULTY": "1"}, name="a")
    b = gunicorn_factory("fault_app:app", cwd=d, workers=1, name="b")
    a.wait_workers(3)
    _, port = nginx_factory([a.bind, b.bind])
    # The route cookie sends every request to A first, B only as its fallback.
    return a, b, port, {"Cookie": f"gx_route={gx.route_name(a.bind)}"}


def _request(port: int, method: str, path: str,
             headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None,
                     headers={"Host": SERVER_NAME, **headers})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _served_by(port: int, headers: dict[str, str]) -> str:
    status, _, body = _request(port, "GET", "/ok", headers)
    assert status == 200, body
    return str(json.loads(body)["bind"])


def test_a_killed_worker_is_retried_elsewhere_and_its_instance_stays(faulty_pair: Any) -> None:
    """Each GET that kills its worker in flight is answered by the other backend, and
    the killed workers' instance stays in rotation (nginx's max_fails would eject it
    after 2 such resets, healthy workers and all, for fail_timeout)."""
    a, b, port, to_a = faulty_pair
    for _ in range(5):
        status, _, body = _request(port, "GET", "/die", to_a)
        assert status == 200 and json.loads(body)["bind"] == b.bind, (status, body)
    a.wait_workers(3)  # Gunicorn replaced the 5 dead workers
    assert a.log_text().count("seen GET /die") == 5
    assert {_served_by(port, to_a) for _ in range(6)} == {a.bind}


def test_an_app_503_is_an_answer_not_retried_and_not_a_failure(faulty_pair: Any) -> None:
    a, b, port, to_a = faulty_pair
    for _ in range(5):
        status, headers, body = _request(port, "GET", "/dep", to_a)
        assert status == 503 and json.loads(body)["bind"] == a.bind, (status, body)
        assert headers.get("retry-after") == "5"
    assert "/dep" not in b.log_text()  # never retried on the other instance
    assert {_served_by(port, to_a) for _ in range(6)} == {a.bind}  # and A was not ejected


def test_a_sent_post_is_never_retried(faulty_pair: Any) -> None:
    a, b, port, to_a = faulty_pair
    status, _, _ = _request(port, "POST", "/die", to_a)
    assert status == 502  # the worker died with it: nginx does not replay it elsewhere
    assert "seen POST /die" in a.log_text() and "POST" not in b.log_text()
    # A POST that never reached a backend (connection refused) is safe to send elsewhere.
    a.stop()
    status, _, body = _request(port, "POST", "/ok", to_a)
    assert status == 200 and json.loads(body)["bind"] == b.bind, (status, body)


# --------------------------------------------------- a backend that never answers


@pytest.fixture
def silent_backend() -> Iterator[str]:
    """A loopback listener that accepts and reads but never answers: a live connection to
    a backend that went silent (what a vanished host looks like once connected)."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(timeout=5)
    for s in held:
        s.close()
    srv.close()


@pytest.mark.parametrize("next_timeout, replayed", [(0.5, False), (0, True)])
def test_a_read_timeout_is_a_504_not_a_replay(silent_backend: str, gunicorn_factory: Any,
                                              nginx_factory: Any, tmp_path: Path,
                                              next_timeout: float, replayed: bool) -> None:
    """A GET pinned to a backend that went silent waits read_timeout, then: with
    next_upstream_timeout below read_timeout (the defaults' shape) a 504, never sent to
    another backend (it may still be running on a live one); with no limit (0), the
    replay nginx would do otherwise."""
    d = tmp_path / "fault"
    d.mkdir()
    (d / "fault_app.py").write_text(FAULT_APP)
    b = gunicorn_factory("fault_app:app", cwd=d, workers=1, name="b")
    failover = gx.Failover(connect_timeout=0.2, read_timeout=1.5,
                           next_upstream_timeout=next_timeout)
    _, port = nginx_factory([silent_backend, b.bind], failover=failover)
    to_silent = {"Cookie": f"gx_route={gx.route_name(silent_backend)}"}
    status, _, body = _request(port, "GET", "/slow", to_silent)
    if replayed:
        assert status == 200 and json.loads(body)["bind"] == b.bind, (status, body)
    else:
        assert status == 504, (status, body)
        assert "/slow" not in b.log_text()
    # A POST is never replayed once sent, whatever the limit.
    status, _, _ = _request(port, "POST", "/slow-post", to_silent)
    assert status == 504 and "/slow-post" not in b.log_text()
