"""Even spread (gunicorn_ext/dispatch.py): the primary accepts and hands each connection
to the worker with the most free threads. Real Gunicorn, real HTTP clients."""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import Gunicorn, wait_for

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "flask_app"
APPS = TESTS / "apps"


def fresh(g: Gunicorn, path: str, timeout: float = 10) -> requests.Response:
    return requests.get(g.url(path), headers={"Connection": "close"}, timeout=timeout)


def ready_slots(g: Gunicorn) -> list[int]:
    c = fresh(g, "/cluster").json()
    return sorted(w["slot"] for w in c["workers"] if w["ready"])


def test_example_spreads_requests_evenly(gunicorn_factory: Any) -> None:
    """Sequential requests on fresh connections rotate over every gthread worker of the
    example (the kernel alone sends most of them to one or two)."""
    g = gunicorn_factory("app:app", config=EXAMPLE / "cluster_conf.py", cwd=EXAMPLE, workers=4)
    wait_for(lambda: ready_slots(g) == [0, 1, 2, 3], 30, what="four workers ready")
    time.sleep(0.3)  # every worker has published its capacity
    slots = collections.Counter(fresh(g, "/whoami").json()["slot"] for _ in range(40))
    assert set(slots) == {0, 1, 2, 3}, slots
    assert max(slots.values()) <= 13 and min(slots.values()) >= 7, slots


def test_sync_workers_spread_when_asked(gunicorn_factory: Any) -> None:
    """even_spread=True dispatches sync workers too; the default leaves them to the kernel."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="sync", WORKERS="3")
    pids = collections.Counter(fresh(g, "/pid").text for _ in range(30))
    assert len(pids) == 3 and max(pids.values()) <= 13 and min(pids.values()) >= 7, pids


def _spread_app(gunicorn_factory: Any, **env: str) -> Gunicorn:
    env.setdefault("WORKERS", "2")
    g = gunicorn_factory("hold_app:app", config=APPS / "hold_conf.py", cwd=APPS,
                         workers=int(env["WORKERS"]), env=env, health_path="/pid")
    g.wait_workers()
    pids = set(g.worker_pids())
    wait_for(lambda: {fresh(g, "/pid").text for _ in range(8)} == {str(p) for p in pids}, 30,
             what="every worker serving")
    return g


def test_busy_gthread_worker_gets_no_new_connection(gunicorn_factory: Any) -> None:
    """A gthread worker whose only thread is busy would accept and queue a connection
    behind it (Gunicorn #3433); dispatched, every new request goes to the free worker
    and is answered while the busy one still holds its thread."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1")
    assert "even spread on" in g.log_path.read_text()
    held: dict[str, str] = {}
    holder = threading.Thread(target=lambda: held.update(pid=fresh(g, "/hold?s=4", 20).text))
    holder.start()
    time.sleep(0.5)
    try:
        pids = [fresh(g, "/pid", 3).text for _ in range(10)]
        still_holding = holder.is_alive()
    finally:
        holder.join(timeout=20)
    assert still_holding, "the held request ended before the others were answered"
    assert held["pid"] not in pids and len(set(pids)) == 1, (held, pids)


def test_connections_without_a_request_leave_no_worker_looking_busy(
        gunicorn_factory: Any) -> None:
    """A gthread worker counts a connection as busy from the moment it receives it (it
    queues for a thread) until Gunicorn settles it. Connections that end without a
    request (a TCP health check, a client that gives up, garbage answered with 400)
    must not leave a count behind: with one thread per worker a leaked count would
    make that worker look full for good, and every request would go to the other."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1")
    host, port = "127.0.0.1", g.port
    for i in range(12):
        with socket.create_connection((host, port), timeout=5) as s:
            if i % 3 == 1:
                s.sendall(b"NOT HTTP\r\n\r\n")
                s.recv(1024)  # Gunicorn's 400
            elif i % 3 == 2:
                s.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\n")  # gives up mid-request
    time.sleep(0.5)  # every worker settled those connections
    pids = collections.Counter(fresh(g, "/pid").text for _ in range(20))
    assert set(pids) == {str(p) for p in g.worker_pids()}, pids
    assert min(pids.values()) >= 7, pids


@pytest.mark.parametrize("worker_class", ["gthread", "sync"])
def test_killed_and_stopped_workers_lose_nothing_else(gunicorn_factory: Any,
                                                       worker_class: str) -> None:
    """A worker SIGKILLed while idle, then each worker stopped gracefully (TERM) while
    a client keeps sending: every request is answered, and the replacements serve."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS=worker_class, THREADS="2", WORKERS="3")
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 25
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = fresh(g, "/pid", 5)
                if r.status_code != 200:
                    failures.append(f"HTTP {r.status_code}")
                answered[0] += 1
            except requests.RequestException as exc:
                failures.append(type(exc).__name__)

    victim = g.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in g.worker_pids() and len(g.worker_pids()) == 3, 20,
             what="the killed worker replaced")
    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for pid in list(g.worker_pids()):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda pid=pid: pid not in g.worker_pids() and len(g.worker_pids()) == 3, 20,
                     what=f"worker {pid} replaced")
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert answered[0] > 20
    assert failures == [], f"{len(failures)} of {answered[0]} failed: {failures[:5]}"
    # Every replacement serves: the last one may still be booting (the primary sends only
    # to ready workers), so ask until every worker answered (CI once saw the last
    # replacement get none of 12 requests sent right after it was forked).
    served: set[str] = set()

    def all_serve() -> bool:
        served.update(fresh(g, "/pid").text for _ in range(6))
        return served >= {str(p) for p in g.worker_pids()}

    wait_for(all_serve, 15, interval=0.2, what="every replacement worker serving")
    assert served == {str(p) for p in g.worker_pids()}  # and none of the stopped ones


@pytest.mark.parametrize("worker_class,even_spread", [("gthread", "0"), ("sync", "default")])
def test_kernels_accept_when_off(gunicorn_factory: Any, worker_class: str,
                                 even_spread: str) -> None:
    g = _spread_app(gunicorn_factory, WORKER_CLASS=worker_class, EVEN_SPREAD=even_spread)
    assert "even spread on" not in g.log_path.read_text()
    assert fresh(g, "/pid").status_code == 200


class KeptAlive:
    """One HTTP/1.1 client on a kept-alive connection (raw socket, so every byte is
    seen): reconnects only when a response said ``Connection: close``, after checking
    that the response was whole and the server then closed (nothing cut short)."""

    def __init__(self, port: int, headers: str = "") -> None:
        self.port = port
        self.headers = headers
        self.sock: socket.socket | None = None
        self.connections = 0
        self.closes = 0

    def get(self, path: str) -> str:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.connections += 1
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{self.headers}\r\n".encode())
        f = self.sock.makefile("rb")
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        head: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            head[name.strip().lower()] = value.strip().lower()
        body = f.read(int(head["content-length"]))
        assert len(body) == int(head["content-length"]), "a response cut short"
        if head.get("connection") == "close":
            assert f.read(1) == b"", "bytes after a Connection: close response"
            f.close()
            self.sock.close()
            self.sock = None
            self.closes += 1
        else:
            f.close()
        return body.decode()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _kept_alive_run(g: Gunicorn, clients: list[KeptAlive], seconds: float,
                    requests_each: int = 5000) -> tuple[list[collections.Counter[str]], list[str]]:
    """Each client sends requests one after another for *seconds* (at most
    *requests_each*; a short hold now and then, so requests overlap); per client, which
    worker pid served how many."""
    counts = [collections.Counter[str]() for _ in clients]
    errors: list[str] = []
    end = time.monotonic() + seconds

    def run(i: int) -> None:
        try:
            for n in range(requests_each):
                if time.monotonic() > end:
                    break
                counts[i][clients[i].get("/hold?s=0.01" if n % 5 == 0 else "/pid")] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"client {i}: {exc!r}")
        finally:
            clients[i].close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=25)
    return counts, errors


def test_kept_alive_clients_spread_over_workers(gunicorn_factory: Any) -> None:
    """Two clients on kept-alive connections and three gthread workers: a connection
    stays with the worker that got it, so plain Gunicorn serves them on two workers
    only. A worker whose recent load is clearly above the others' answers one of its
    kept-alive requests with ``Connection: close`` (after a whole response), and the
    client's next connection goes to the least loaded worker: all three serve, each a
    fair share."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1", WORKERS="3")
    pids = {str(p) for p in g.worker_pids()}
    time.sleep(1.5)  # the recent load of the warm-up requests fades
    clients = [KeptAlive(g.port), KeptAlive(g.port)]
    counts, errors = _kept_alive_run(g, clients, 3.0)
    assert errors == [], errors
    served = counts[0] + counts[1]
    total = sum(served.values())
    assert set(served) == pids, served
    # Every worker serves at least half an even share (plain Gunicorn: none for one).
    assert min(served.values()) >= total / len(pids) / 2, served
    closes = clients[0].closes + clients[1].closes
    assert closes >= 2
    # Bounded: far fewer closes than requests (at most one per 0.1 s per worker).
    assert closes <= total // 20, (closes, total)


def test_upgrade_requests_are_never_closed(gunicorn_factory: Any) -> None:
    """A client whose requests ask to upgrade the connection (as a WebSocket handshake
    does) is never answered ``Connection: close``, even on a worker that closes the
    other client's connections to rebalance."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1", WORKERS="3")
    time.sleep(1.5)
    clients = [KeptAlive(g.port),
               KeptAlive(g.port, headers="Connection: keep-alive, Upgrade\r\nUpgrade: x-test\r\n")]
    counts, errors = _kept_alive_run(g, clients, 3.0)
    assert errors == [], errors
    assert clients[0].closes >= 1 and len(counts[0]) >= 2, counts[0]
    assert clients[1].closes == 0 and clients[1].connections == 1 and len(counts[1]) == 1


def test_kept_alive_connections_stay_when_off(gunicorn_factory: Any) -> None:
    """even_spread=False: Gunicorn's own keep-alive, every connection serves its client
    to the end, on one worker."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1", WORKERS="3",
                    EVEN_SPREAD="0")
    clients = [KeptAlive(g.port), KeptAlive(g.port)]
    counts, errors = _kept_alive_run(g, clients, 1.5)
    assert errors == [], errors
    assert [c.closes for c in clients] == [0, 0]
    assert [len(c) for c in counts] == [1, 1], counts


def test_a_client_slow_to_close_does_not_stall_the_worker(gunicorn_factory: Any) -> None:
    """Gunicorn 27 closes a connection gracefully, reading until the client closes too
    (up to 2 s). It does so on the worker's main thread, which also takes the
    connections the primary sends: one client slow to close would stall every other
    client of that worker. Dispatched, the thread that served the request closes it:
    another request to the same worker is answered while the first client's
    connection is still open."""
    import inspect

    from gunicorn.workers.gthread import TConn

    if "graceful" not in inspect.signature(TConn.close).parameters:
        pytest.skip("this Gunicorn closes a connection at once (no graceful close)")
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="2", WORKERS="1")
    slow = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        slow.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        f = slow.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 200")
        while f.readline() not in (b"\r\n", b""):
            pass
        assert f.read(len(str(g.worker_pids()[0]))) == str(g.worker_pids()[0]).encode()
        # The response is whole; the server shut its side (FIN), and reads on until
        # this client closes. This one does not; another client asks meanwhile:
        assert fresh(g, "/pid").status_code == 200
        # Still read (drained) by the server: a byte sent now draws no reset. Had the
        # worker answered only after giving up on this client, it would.
        slow.sendall(b"x")
        time.sleep(0.3)
        try:
            slow.sendall(b"y")
            reset = slow.recv(1) != b""
        except (ConnectionResetError, BrokenPipeError):
            reset = True
        assert not reset, "the other request was answered only after the slow client's close"
    finally:
        slow.close()


def test_connections_waiting_for_a_free_thread_are_all_answered(gunicorn_factory: Any) -> None:
    """Every thread busy: new connections wait in the listen backlog (the primary
    watches it edge-triggered, so nothing there raises another event) and the first
    worker to free a thread wakes the primary, which hands them out; none is lost or
    left waiting, and each goes to a worker once a thread is free."""
    g = _spread_app(gunicorn_factory, WORKER_CLASS="gthread", THREADS="1", WORKERS="2")
    results: list[str] = []
    errors: list[str] = []

    def get(path: str) -> None:
        try:
            results.append(fresh(g, path, 20).text)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(repr(exc))

    holders = [threading.Thread(target=get, args=("/hold?s=1",)) for _ in range(2)]
    for t in holders:
        t.start()
    time.sleep(0.4)  # both threads held
    waiting = [threading.Thread(target=get, args=("/hold?s=0.05",)) for _ in range(8)]
    start = time.monotonic()
    for t in waiting:
        t.start()
    for t in holders + waiting:
        t.join(timeout=25)
    took = time.monotonic() - start
    assert errors == [] and len(results) == 10, (errors, results)
    assert set(results) == {str(p) for p in g.worker_pids()}, results
    # Generous: 0.6 s of holds left, then 8 x 0.05 s over two threads, on a busy machine.
    assert took < 10, took


def test_close_one_closes_one_eligible_request_then_steps_aside() -> None:
    """gi.close_one wraps handle_request only until one eligible request was answered
    with a close; gi.cancel_close stops it. Unit level: a stand-in worker."""
    from gunicorn_ext import gunicorn_internals as gi

    class Req:
        def __init__(self, ok: bool) -> None:
            self.ok, self.closed = ok, False

        def force_close(self) -> None:
            self.closed = True

    class Worker:
        def handle_request(self, req: Req, conn: Any) -> str:
            return "handled"

    w = Worker()
    closes: list[int] = []
    gi.close_one(w, lambda r: r.ok, lambda: closes.append(1))
    first, second, third = Req(False), Req(True), Req(True)
    assert w.handle_request(first, None) == "handled" and not first.closed
    assert "handle_request" in vars(w)  # still looking
    assert w.handle_request(second, None) == "handled" and second.closed
    assert "handle_request" not in vars(w) and closes == [1]
    assert w.handle_request(third, None) == "handled" and not third.closed
    gi.close_one(w, lambda r: True, lambda: closes.append(2))
    gi.cancel_close(w)
    assert "handle_request" not in vars(w)
    assert w.handle_request(Req(True), None) == "handled" and closes == [1]


class _Hub:
    """The hub's surface the dispatcher uses, for unit tests: timers are kept, not run."""

    def __init__(self) -> None:
        self.later: list[Any] = []

    def call_later(self, delay: float, fn: Any) -> None:
        self.later.append(fn)

    def watch(self, fd: int, callback: Any) -> None:
        pass

    def unwatch(self, fd: int) -> None:
        pass


def _dispatcher(capacities: list[int]) -> tuple[Any, socket.socket, list[Any]]:
    """A Dispatcher (real listener, board and socketpairs) with one ready worker per
    capacity, and each worker's DispatchedListener. Unit level: no Gunicorn."""
    import mmap

    from gunicorn_ext import dispatch as d

    class Log:
        def error(self, *a: Any) -> None:
            raise AssertionError(a)

        warning = info = error

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.setblocking(False)
    disp = d.Dispatcher(_Hub())
    disp.log, disp.enabled = Log(), True
    disp.board = mmap.mmap(-1, d._offset(d.CELLS))
    d._CELLS_USED.pack_into(disp.board, 4, len(capacities))
    disp._listeners, disp._watching = [lst], True

    class Listener:  # Gunicorn's listener object
        sock = lst

    listeners = []
    for cell, capacity in enumerate(capacities):
        p, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p.setblocking(False)
        c.setblocking(False)
        disp._workers[p.fileno()] = d._Worker(p, None, cell, 0)
        d._CELL.pack_into(disp.board, d._offset(cell), capacity, 0, 0, 0, 0.0, time.monotonic(),
                          0.0)
        listeners.append(d.DispatchedListener(c, [Listener()], capacity, True, disp.board, cell))
    return disp, lst, listeners


def test_room_running_out_within_a_burst_holds_the_connection_until_room_returns() -> None:
    """Two connections queued, one free thread: the first goes to the worker, the second
    waits in the primary (flag raised for a wake-up), and goes out when room returns,
    still a working connection. Unit level: a Dispatcher with a stand-in hub."""
    from gunicorn_ext import dispatch as d

    disp, lst, (dl,) = _dispatcher([1])
    clients = [socket.create_connection(lst.getsockname(), timeout=5) for _ in range(2)]
    try:
        wait_for(lambda: disp._on_listener(0) is None and disp.undelivered() == 2, 5,
                 what="one connection sent, one held")
        assert len(disp._returned) == 1 and d._FLAG.unpack_from(disp.board, 0)[0] == 1
        first, addr = dl.accept()
        dl.submitted_one()  # Gunicorn hands it to the (only) thread
        assert addr == clients[0].getsockname()
        with pytest.raises(BlockingIOError):
            dl.accept()  # nothing more: the held one waits for room
        disp._update()
        assert disp.undelivered() == 1
        dl.settled()  # the thread is free again
        disp._update()
        assert disp._returned == [] and disp.undelivered() == 1  # sent, not accepted yet
        second, addr = dl.accept()
        dl.submitted_one()
        assert addr == clients[1].getsockname() and disp.undelivered() == 0
        clients[1].sendall(b"ping")
        assert second.recv(4) == b"ping"
        first.close()
        second.close()
    finally:
        for c in clients:
            c.close()
        lst.close()


def test_pick_prefers_most_room_then_least_served_then_longest_waiting() -> None:
    """The primary's choice: the most free threads; on a tie the fewest requests served
    lately; then the worker that waited longest since its last connection; never a
    stopping worker or one not ready. Unit level."""
    from gunicorn_ext import dispatch as d

    disp, lst, _ = _dispatcher([4, 4, 4, 4])
    try:
        a, b, c, e = disp._workers.values()
        board, now = disp.board, time.monotonic()

        def cell(w: Any, capacity: int, running: int, served: float) -> None:
            d._CELL.pack_into(board, w.offset, capacity, running, 0, 0, 0.0, now, served)

        cell(a, 4, 2, 0.0)
        cell(b, 4, 1, 50.0)
        cell(c, 4, 1, 40.0)
        cell(e, 0, 0, 0.0)  # not ready
        assert disp._pick() is c  # b and c have most room; c served fewer
        cell(b, 4, 1, 40.0)
        b.since, c.since = 7, 3
        assert disp._pick() is c  # same load: c waited longer
        c.stopping = True
        assert disp._pick() is b
        for w in (a, b):
            cell(w, 4, 4, 0.0)
        assert disp._pick() is None  # no room anywhere
    finally:
        lst.close()
