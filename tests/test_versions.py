"""The Gunicorn version range: pyproject's bound is what is tested, and startup checks it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gunicorn
import pytest

from gunicorn_ext.versions import NEWEST, OLDEST, UnsupportedGunicorn, check_gunicorn

ROOT = Path(__file__).resolve().parent.parent
PLAIN_APP = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n"


def _bound() -> tuple[tuple[int, ...], tuple[int, ...]]:
    found = re.search(r'^\s*"(gunicorn[<>=][^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml has no gunicorn dependency"
    spec = found.group(1)
    low = re.search(r">=\s*([\d.]+)", spec)
    high = re.search(r"<\s*([\d.]+)", spec)
    assert low and high, f"pyproject's {spec!r} needs both bounds: >=OLDEST,<NEWEST+1"
    return (tuple(int(p) for p in low.group(1).split(".")),
            tuple(int(p) for p in high.group(1).split(".")))


def _pad(version: tuple[int, ...]) -> tuple[int, ...]:
    return (version + (0, 0, 0))[:3]


def test_pyproject_bound_is_the_tested_range() -> None:
    low, high = _bound()
    assert _pad(low) == OLDEST
    assert high == (NEWEST[0] + 1,)


def test_the_installed_gunicorn_is_in_the_tested_range() -> None:
    version = tuple(gunicorn.version_info)
    assert OLDEST <= version and version[:1] <= NEWEST, gunicorn.__version__
    expect = os.environ.get("GX_GUNICORN_EXPECT")  # `make test-oldest`: exactly the bound
    if expect:
        assert _pad(version) == _pad(tuple(int(p) for p in expect.split("."))), gunicorn.__version__


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)


def test_check_refuses_older_and_warns_once_about_newer() -> None:
    log = _Log()
    check_gunicorn(log, OLDEST)
    check_gunicorn(log, NEWEST + (9, 9))
    assert log.lines == []
    with pytest.raises(UnsupportedGunicorn, match=r"needs Gunicorn 25\.0\.0 or newer .*this is Gunicorn 24\.2\.0"):
        check_gunicorn(log, (24, 2, 0))
    check_gunicorn(log, (NEWEST[0] + 1, 0, 0))
    assert len(log.lines) == 1 and f"Gunicorn {NEWEST[0] + 1}.0.0 is newer" in log.lines[0]


def _run(tmp_path: Path, fake: tuple[int, ...]) -> subprocess.CompletedProcess[str]:
    """A real Gunicorn whose config pretends it is version *fake*, stopped after boot."""
    (tmp_path / "plain_app.py").write_text(PLAIN_APP)
    conf = tmp_path / "conf.py"
    conf.write_text(f"import gunicorn, gunicorn_ext\ngunicorn.version_info = {fake!r}\n"
                    "bind = '127.0.0.1:0'\nworkers = 1\n"
                    "def when_ready(server):\n    server.log.info('READY')\n"
                    "    import os, signal; os.kill(os.getpid(), signal.SIGTERM)\n"
                    "gunicorn_ext.enable(globals(), control_socket=False)\n")
    return subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(conf), "--chdir",
                           str(tmp_path), "plain_app:app"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_an_older_gunicorn_is_refused_at_startup_with_one_line(tmp_path: Path) -> None:
    r = _run(tmp_path, (24, 1, 1))
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "needs Gunicorn" in line]
    assert len(lines) == 1 and "this is Gunicorn 24.1.1" in lines[0], r.stderr[-2000:]
    assert "Booting worker" not in r.stderr and "Traceback" not in r.stderr


def test_a_newer_gunicorn_starts_with_one_warning(tmp_path: Path) -> None:
    r = _run(tmp_path, (NEWEST[0] + 1, 0, 0))
    assert "READY" in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "is newer than the versions" in line]
    assert len(lines) == 1 and "[WARNING]" in lines[0], r.stderr[-2000:]
