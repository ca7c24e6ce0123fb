"""The example's chat page (``GET /chat``) in a real browser: headless Chromium, through nginx.

Two instances of the example (``examples/flask_app`` started as ``make run`` starts it:
its ``cluster_conf.py``, two gthread workers each on per-worker ports, ``STATE_URL`` a
real redis-server) behind the nginx config :func:`gunicorn_ext.nginx.render` produces,
with the four worker ports as backends. Chromium (Debian's ``chromium``, installed by
``make browser-deps``) is driven over the DevTools protocol with websocket-client; each
browser context has its own cookie jar, so it is one user.

* Two pages, on workers of different instances, exchange messages both ways: each
  message shows once on both pages, naming the worker that took it. The first page is
  on long-polling only and starts with no cookie at all (the example pins it by
  itself, else its polls would scatter over the workers); the second, on a WebSocket,
  is given the route cookie of a worker of the other instance, as that worker would
  have set it. Screenshots of both pages go to ``tests/output/`` for a human to see.
* The worker a page is on is SIGKILLed: the page reconnects by itself, is re-pinned,
  and chats on (on either transport).
* A page from another origin (same host, another port) loads the same client script
  but cannot connect, on either transport.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import socketio
import websocket
from harness import (
    Gunicorn,
    HarnessError,
    RedisServer,
    find_binary,
    free_port,
    free_port_pair,
    running_nginx,
    serves,
    tail,
    wait_for,
)

from gunicorn_ext.nginx import render, wrapper_conf
from gunicorn_ext.sticky import route_name

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
OUTPUT = Path(__file__).resolve().parent / "output"  # git-ignored
TIMEOUT = 10.0  # any one wait: a DevTools answer, a connection, a message
DUPLICATE_WINDOW = 0.5  # how long a duplicate gets to show up
VIEWPORT = {"width": 760, "height": 520, "deviceScaleFactor": 1, "mobile": False}
# The launch flags for this sandboxed machine, plus: no throttling of pages in the
# background (two pages are open at once and neither has the focus).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
         "--disable-backgrounding-occluded-windows", "--remote-debugging-port=0"]

# ----------------------------------------------------------------------------- Chromium


class DevToolsError(RuntimeError):
    """Chromium answered a DevTools command with an error, or not in time."""


class Chromium:
    """One headless Chromium with a fresh profile, driven over its DevTools WebSocket.

    Commands are sent and answered one at a time on the browser's connection, each
    page's through its own flat session; events (console lines, exceptions) are kept
    for failure messages.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        profile.mkdir(parents=True)
        self.log_path = profile.parent / "chromium.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            active = profile / "DevToolsActivePort"

            def endpoint() -> str | None:
                if self.proc.poll() is not None:
                    raise HarnessError(f"chromium exited rc={self.proc.returncode}:\n"
                                       f"{tail(self.log_path)}")
                lines = active.read_text().split() if active.exists() else []
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) == 2 else None

            url = wait_for(endpoint, 30, what="Chromium's DevToolsActivePort")
            # No Origin header: Chromium refuses DevTools connections from web origins.
            self.ws = websocket.create_connection(url, timeout=TIMEOUT, suppress_origin=True)
        except BaseException:
            self.kill()
            raise
        self._ids = 0
        self.events: list[dict[str, Any]] = []
        self.contexts: list[str] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._ids += 1
        ident = self._ids
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                reply = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                raise DevToolsError(f"{method}: no answer in {TIMEOUT}s")
            if reply.get("id") == ident:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def page(self, url: str, cookies: Sequence[dict[str, Any]] = ()) -> Page:
        """A new page in a browser context of its own (its own cookies), opening *url*."""
        context = self.call("Target.createBrowserContext")["browserContextId"]
        self.contexts.append(context)
        if cookies:
            self.call("Storage.setCookies", cookies=list(cookies), browserContextId=context)
        target = self.call("Target.createTarget", url="about:blank",
                           browserContextId=context)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session)
        self.call("Emulation.setDeviceMetricsOverride", session, **VIEWPORT)
        self.call("Page.navigate", session, url=url)
        return Page(self, context, session)

    def close_pages(self) -> None:
        """Close every page opened so far (their connections go with them)."""
        while self.contexts:
            self.call("Target.disposeBrowserContext", browserContextId=self.contexts.pop())
        self.events.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        with contextlib.suppress(Exception):
            self.ws.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class Page:
    """One page of :class:`Chromium`, in its own browser context."""

    def __init__(self, browser: Chromium, context: str, session: str) -> None:
        self.browser = browser
        self.context = context
        self.session = session

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript *expression* in the page (JSON-able), awaited."""
        result = self.browser.call("Runtime.evaluate", self.session, expression=expression,
                                   returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def poll(self, expression: str, timeout: float) -> Any:
        """Poll *expression* until it is truthy and return it; None after *timeout* s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value or time.monotonic() > deadline:
                return value or None
            time.sleep(0.05)

    def wait(self, expression: str, what: str, timeout: float = TIMEOUT) -> Any:
        """Poll *expression* until it is truthy; fail saying what the page shows."""
        value = self.poll(expression, timeout)
        if value is None:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.describe()}",
                        pytrace=False)
        return value

    def describe(self) -> str:
        """What the page shows and logged: for failure messages."""
        try:
            shown = self.eval("document.body ? document.body.innerText : document.readyState")
        except DevToolsError as exc:
            shown = f"(unreadable: {exc})"
        lines = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled":
                lines.append(" ".join(str(a.get("value", a.get("description", "")))
                                      for a in params.get("args", [])))
            elif event["method"] == "Runtime.exceptionThrown":
                lines.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        return f"--- page shows:\n{shown}\n--- console:\n" + "\n".join(lines)

    def connected(self, transport: str, *, not_pid: int = 0,
                  timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait until the chat page is connected over *transport* and says which worker
        it is on (another process than *not_pid*); return what it says."""
        status: dict[str, Any] = self.wait(
            "(s => s && s.dataset.state === 'connected' && s.dataset.pid"
            f" && s.dataset.pid !== '{not_pid}' && s.dataset.transport === '{transport}'"
            " && Object.assign({}, s.dataset))(document.getElementById('status'))",
            f"the page connected over {transport}"
            + (f", on a worker other than pid {not_pid}" if not_pid else ""),
            timeout)
        return status

    def send(self, text: str) -> None:
        """Type *text* into the message box and press Enter, as a user would."""
        self.eval("document.querySelector('#say input').focus()")
        self.browser.call("Input.insertText", self.session, text=text)
        for kind in ("keyDown", "keyUp"):
            self.browser.call("Input.dispatchKeyEvent", self.session, type=kind, key="Enter",
                              code="Enter", windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                              **({"text": "\r"} if kind == "keyDown" else {}))
        self.wait("document.querySelector('#say input').value === ''",
                  f"{text!r} acknowledged (the box emptied)")

    def messages(self, text: str) -> list[dict[str, Any]]:
        """The messages shown whose text is *text*, with the worker each names."""
        found: list[dict[str, Any]] = self.eval(
            "Array.from(document.querySelectorAll('#messages li')).map(li => ({"
            "text: li.querySelector('.text').textContent, instance: li.dataset.instance,"
            f" slot: Number(li.dataset.slot)}})).filter(m => m.text === {json.dumps(text)})")
        return found

    def cookies(self) -> dict[str, dict[str, Any]]:
        got = self.browser.call("Storage.getCookies", browserContextId=self.context)
        return {c["name"]: c for c in got["cookies"]}

    def screenshot(self, path: Path) -> None:
        data = self.browser.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_binary("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: run `make browser-deps` "
                    "(apt-get install chromium)", pytrace=False)
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def browser(chromium: Chromium) -> Iterator[Chromium]:
    """The module's Chromium; the pages a test opens are closed after it."""
    yield chromium
    chromium.close_pages()


# ----------------------------------------------------------------------------- servers


class Cluster:
    """Two example instances (east, west) of two workers, one redis-server, nginx."""

    def __init__(self, url: str, instances: dict[str, Gunicorn], bases: dict[str, int],
                 nginx_dir: Path) -> None:
        self.url = url
        self.instances = instances
        self.bases = bases
        self.nginx_dir = nginx_dir

    def route(self, instance: str, slot: int) -> str:
        """The route cookie value of one worker (what it sets, what nginx maps)."""
        return route_name(f"127.0.0.1:{self.bases[instance] + slot}")

    def mark(self) -> dict[str, int]:
        """Where each log ends now (for :meth:`logs`)."""
        return {name: len(g.log_text()) for name, g in self.instances.items()}

    def logs(self, since: dict[str, int] | None = None) -> str:
        """Both instances' logs (from *since*, a :meth:`mark`)."""
        since = since or {}
        return "\n".join(g.log_text()[since.get(name, 0):] for name, g in self.instances.items())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("browser-chat")
    if find_binary("redis-server") is None or find_binary("nginx") is None:
        pytest.fail("redis-server or nginx is not installed: run `make system-deps`",
                    pytrace=False)
    listen = free_port()
    bases: dict[str, int] = {}
    for name in ("east", "west"):
        base = free_port_pair()
        while any(abs(base - other) <= 1 for other in bases.values()) or base - 1 <= listen <= base + 1:
            base = free_port_pair()
        bases[name] = base
    with contextlib.ExitStack() as stack:
        redis = RedisServer(tmp / "redis").start()
        stack.callback(redis.stop)
        instances: dict[str, Gunicorn] = {}
        for name, base in bases.items():
            g = Gunicorn("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=2,
                         log_dir=tmp, name=f"gunicorn-{name}",
                         env={"WORKER_PORTS_BASE": str(base), "INSTANCE": name,
                              "STATE_URL": redis.url, "SECRET_KEY": "k" * 32,
                              # nginx passes Host without its port: name nginx's origin.
                              "CHAT_ALLOWED_ORIGINS": f"http://127.0.0.1:{listen}"})
            stack.callback(g.stop)
            instances[name] = g.start()
        for g in instances.values():
            g.wait_ready(30)
        ports = [base + slot for base in bases.values() for slot in (0, 1)]
        wait_for(lambda: all(serves(p) for p in ports), 20, what="the four worker ports")
        site = tmp / "nginx" / "site.conf"
        site.parent.mkdir()
        site.write_text(render(backends=[f"127.0.0.1:{p}" for p in ports], listen=listen,
                               server_name="127.0.0.1", default_server=False))
        conf = site.parent / "nginx.conf"
        conf.write_text(wrapper_conf([str(site)], str(site.parent), access_log=True,
                                     user="root" if os.geteuid() == 0 else None))
        nginx_dir = stack.enter_context(running_nginx(conf, listen))
        _subscribe_every_worker(ports)
        yield Cluster(f"http://127.0.0.1:{listen}", instances, bases, nginx_dir)


def _subscribe_every_worker(ports: list[int]) -> None:
    """Have every worker subscribed to Redis before a page opens.

    python-socketio subscribes a worker from a thread started by its first client, so a
    message sent just after can miss that worker: a python-socketio client on each
    worker port sends probes until all have seen one (pages opened later see none).
    """
    seen = [threading.Event() for _ in ports]
    clients = [socketio.Client(reconnection=False) for _ in ports]
    try:
        for client, event, port in zip(clients, seen, ports, strict=True):
            client.on("said", lambda m, e=event: e.set(), namespace="/chat")
            client.connect(f"http://127.0.0.1:{port}", transports=["websocket"],
                           namespaces=["/chat"], wait_timeout=TIMEOUT)
        deadline = time.monotonic() + 20
        n = 0
        while not all(event.wait(0.3) for event in seen):
            assert time.monotonic() < deadline, "not every worker is subscribed to Redis"
            clients[0].call("say", {"text": f"probe {n}"}, namespace="/chat", timeout=TIMEOUT)
            n += 1
    finally:
        for client in clients:
            client.disconnect()


# ----------------------------------------------------------------------------- tests


def _once_everywhere(pages: list[Page], text: str, instance: str, slot: int) -> None:
    for page in pages:
        page.wait(f"Array.from(document.querySelectorAll('#messages .text'))"
                  f".some(t => t.textContent === {json.dumps(text)})", f"{text!r} shown")
    time.sleep(DUPLICATE_WINDOW)
    for page in pages:
        assert page.messages(text) == [{"text": text, "instance": instance, "slot": slot}], (
            page.describe())


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_two_browsers_on_two_instances_chat_both_ways(browser: Chromium, cluster: Cluster) -> None:
    access_log = cluster.nginx_dir / "access.log"
    logged, marks = access_log.stat().st_size, cluster.mark()
    # Page a: long-polling only, and no cookie: nginx gives its first request to a worker
    # of the pool, which pins it; every later poll must reach that same worker.
    a = browser.page(f"{cluster.url}/chat?transport=polling")
    where_a = a.connected("polling")
    ia, sa = where_a["instance"], int(where_a["slot"])
    route = a.cookies()["gx_route"]
    assert route["value"] == cluster.route(ia, sa), route
    assert route["httpOnly"], route
    # Page b: a WebSocket (the page's default), pinned to the other slot of the other
    # instance.
    ib, sb = ("west" if ia == "east" else "east"), 1 - sa
    b = browser.page(f"{cluster.url}/chat", cookies=[{
        "name": "gx_route", "value": cluster.route(ib, sb), "url": cluster.url,
        "httpOnly": True, "sameSite": "Lax"}])
    where_b = b.connected("websocket")
    assert (where_b["instance"], int(where_b["slot"])) == (ib, sb), b.describe()
    assert int(where_b["pid"]) in cluster.instances[ib].worker_pids()
    assert int(where_a["pid"]) in cluster.instances[ia].worker_pids()

    hello = f"hello from {ia} {uuid.uuid4().hex[:8]}"
    a.send(hello)
    _once_everywhere([a, b], hello, ia, sa)
    reply = f"and back from {ib} \u00e9\u00e8 <b>not bold</b> {uuid.uuid4().hex[:8]}"
    b.send(reply)
    _once_everywhere([a, b], reply, ib, sb)
    # Text, never markup.
    assert a.eval("document.querySelectorAll('#messages b').length") == 0

    a.screenshot(OUTPUT / "browser_chat-a.png")
    b.screenshot(OUTPUT / "browser_chat-b.png")

    # Every poll of page a reached the worker holding its session. (Sessions seen before
    # this test are left out: an earlier test's closed page may log its last poll late.)
    log = access_log.read_bytes()
    poll = re.compile(rb'"(?:GET|POST) /socket\.io/\?\S*?transport=polling&\S*?sid=([\w-]+)\S*'
                      rb' HTTP/1\.1" (\d+)')
    earlier = {m[1] for m in poll.finditer(log, 0, logged)}
    polls = [m[2].decode() for m in poll.finditer(log, logged) if m[1] not in earlier]
    assert len(polls) >= 4 and set(polls) == {"200"}, polls
    logs = cluster.logs(marks)
    assert "Session ID unknown" not in logs and "Invalid session" not in logs


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_a_page_whose_worker_is_killed_reconnects_and_chats_on(
        browser: Chromium, cluster: Cluster, transport: str) -> None:
    # The worker holding page a's connection is SIGKILLed: socket.io-client reconnects
    # by itself, through nginx (the pinned upstream's backups, or the respawned
    # worker), the worker that answers re-pins the page, and the chat goes on.
    query = "?transport=polling" if transport == "polling" else ""
    a = browser.page(f"{cluster.url}/chat{query}")
    before = a.connected(transport)
    ia, pid = before["instance"], int(before["pid"])
    ib = "west" if ia == "east" else "east"
    b = browser.page(f"{cluster.url}/chat", cookies=[{
        "name": "gx_route", "value": cluster.route(ib, 0), "url": cluster.url}])
    b.connected("websocket")
    os.kill(pid, signal.SIGKILL)
    try:
        after = a.connected(transport, not_pid=pid, timeout=15)
        ia, sa = after["instance"], int(after["slot"])
        assert int(after["pid"]) in cluster.instances[ia].worker_pids()
        assert a.cookies()["gx_route"]["value"] == cluster.route(ia, sa)
        # The worker it reached may be the one respawned in the killed one's place,
        # subscribed to Redis only since this page came: probe until it is.
        deadline = time.monotonic() + 15
        for n in itertools.count():
            b.send(f"probe {n}")
            if a.poll(f"document.body.innerText.includes('probe {n}')", 0.5):
                break
            assert time.monotonic() < deadline, a.describe()
        hello = f"back on {ia} {uuid.uuid4().hex[:8]}"
        a.send(hello)
        _once_everywhere([a, b], hello, ia, sa)
        reply = f"welcome back from {ib} {uuid.uuid4().hex[:8]}"
        b.send(reply)
        _once_everywhere([a, b], reply, ib, 0)
    finally:  # the cluster is whole again for the next test
        ports = [base + slot for base in cluster.bases.values() for slot in (0, 1)]
        wait_for(lambda: all(serves(p) for p in ports), 20, what="the killed worker respawned")


FOREIGN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>not the chat</title></head><body>
<script src="{server}/static/socket.io.min.js"></script>
<script>
window.results = {{}};
for (const transport of ["polling", "websocket"]) {{
  const s = io("{server}/chat", {{transports: [transport], reconnection: false,
                                  forceNew: true, timeout: 5000}});
  s.on("connect", () => {{ window.results[transport] = "connected"; }});
  s.on("connect_error", (e) => {{ window.results[transport] = "refused: " + e.message; }});
}}
</script></body></html>
"""


@contextlib.contextmanager
def _foreign_site(server: str) -> Iterator[str]:
    """A plain HTTP server on another port (another origin) serving FOREIGN_PAGE."""
    body = FOREIGN_PAGE.format(server=server).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.nginx
def test_a_page_from_another_origin_cannot_connect(browser: Chromium, cluster: Cluster) -> None:
    with _foreign_site(cluster.url) as origin:
        page = browser.page(f"{origin}/")
        page.wait("typeof io === 'function'", "the client script loaded from the chat's origin")
        results = page.wait("window.results && Object.keys(window.results).length === 2"
                            " && window.results", "both connection attempts to end")
    assert results == {"polling": "refused: xhr poll error",
                       "websocket": "refused: websocket error"}, results
    # Refused by the example (400, naming the origin), not merely by the browser.
    log = (cluster.nginx_dir / "access.log").read_text()
    for transport in ("polling", "websocket"):
        assert re.search(rf'"GET /socket\.io/\?EIO=4&transport={transport}\S* HTTP/1\.1" 400 ',
                         log), (transport, log[-2000:])
    wait_for(lambda: f"{origin} is not an accepted origin" in cluster.logs(), 5,
             what="the example's log line naming the refused origin")


def test_the_vendored_client_is_the_npm_file_its_header_names() -> None:
    # The header comment says which npm file this is; the rest must be that file,
    # byte for byte, minus its sourceMappingURL line (the map is not shipped).
    vendored = (EXAMPLE / "static" / "socket.io.min.js").read_bytes()
    header, sep, body = vendored.partition(b" */\n")
    assert sep and header.startswith(b"/*! Vendored"), header[:80]
    version = re.search(rb"socket\.io-client (\d+\.\d+\.\d+)", header)
    digest = re.search(rb"sha256 of that file: ([0-9a-f]{64})", header)
    assert version and digest, header
    assert body.startswith(b"/*!\n * Socket.IO v" + version[1] + b"\n"), body[:60]
    original = body + b"//# sourceMappingURL=socket.io.min.js.map\n"
    assert hashlib.sha256(original).hexdigest() == digest[1].decode()
    assert b"MIT License" in (EXAMPLE / "static" / "socket.io-client.LICENSE").read_bytes()
