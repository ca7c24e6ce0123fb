"""The package as users get it: the sdist and wheel built, checked, and installed into a
fresh venv outside the source tree, running the example cluster from there.

``make dist`` builds into ``dist/`` and runs this file with ``GX_DIST_DIR=dist``; under
plain ``make test`` the module builds its own copy in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from harness import Gunicorn, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

#: Package folder in the tree -> where its files land in the wheel.
PACKAGE_DIRS = {"gunicorn_ext": "gunicorn_ext", "state": "gunicorn_ext/state"}


def _run(cmd: list[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed rc={proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GX_DIST_DIR")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    # The default of `python -m build`: the sdist first, then the wheel built from it, so a
    # file missing from the sdist also breaks the wheel.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], timeout=400)
    return out


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def test_twine_check_passes(dist_dir: Path) -> None:
    files = [str(_one(dist_dir, "*.whl")), str(_one(dist_dir, "*.tar.gz"))]
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *files])
    assert out.stdout.count("PASSED") == 2, out.stdout


def test_wheel_holds_every_runtime_file(dist_dir: Path) -> None:
    names = set(zipfile.ZipFile(_one(dist_dir, "*.whl")).namelist())
    expected = {"gunicorn_ext/py.typed"}
    for folder, target in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            expected.add(f"{target}/{path.relative_to(REPO / folder).as_posix()}")
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    top = {n.split("/")[0] for n in names}
    assert top - {"gunicorn_ext"} == {n for n in top if n.endswith(".dist-info")}, (
        f"the wheel installs more than gunicorn_ext: {sorted(top)}")
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(_one(dist_dir, "*.whl")).read(meta).decode()
    assert "Description-Content-Type: text/markdown" in text
    assert "make test" in text, "the README is the long description"
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.split()[1].lower().startswith(("flask", "redis")) for r in core), core
    extras = {line.split(":", 1)[1].strip() for line in text.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"flask", "redis", "socketio", "dev"} <= extras


def test_sdist_holds_the_project(dist_dir: Path) -> None:
    import tarfile

    with tarfile.open(_one(dist_dir, "*.tar.gz")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("README.md", "CHANGES.md", "LICENSE", "pyproject.toml",
                     "state/flask.py", "gunicorn_ext/py.typed",
                     "examples/flask_app/cluster_conf.py", "nginx/gunicorn-ext.conf"):
        assert required in names, f"{required} missing from the sdist"


def _venv(root: Path, wheel: Path, extras: str) -> Path:
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    spec = f"{wheel}[{extras}]" if extras else str(wheel)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
          "--disable-pip-version-check", spec], timeout=400)
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def core_venv(dist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("core"), _one(dist_dir, "*.whl"), "")


@pytest.fixture(scope="module")
def full_venv(dist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("full"), _one(dist_dir, "*.whl"), "flask,redis,socketio")


def test_core_install_is_lean_and_names_missing_extras(core_venv: Path, tmp_path: Path) -> None:
    py = str(core_venv / "bin" / "python")
    probe = (
        "import importlib, importlib.util, json\n"
        "out = {'flask': importlib.util.find_spec('flask') is not None,\n"
        "       'redis': importlib.util.find_spec('redis') is not None,\n"
        "       'state': importlib.util.find_spec('state') is not None}\n"
        "import gunicorn_ext.hooks, gunicorn_ext.metrics, gunicorn_ext.nginx\n"
        "for mod in ('gunicorn_ext.state.flask', 'gunicorn_ext.state.redis', 'gunicorn_ext.socketio'):\n"
        "    try:\n"
        "        importlib.import_module(mod)\n"
        "        out[mod] = 'imported'\n"
        "    except ImportError as exc:\n"
        "        out[mod] = str(exc)\n"
        "from gunicorn_ext.state import open_store\n"
        "s = open_store('memory://'); s.set('k', b'v'); out['memory'] = s.get('k').decode()\n"
        "print(json.dumps(out))\n")
    out = json.loads(_run([py, "-c", probe], cwd=tmp_path, env=_clean_env()).stdout)
    assert out["flask"] is False and out["redis"] is False and out["state"] is False, out
    assert "pip install 'gunicorn-ext[flask]'" in out["gunicorn_ext.state.flask"], out
    assert "pip install 'gunicorn-ext[redis]'" in out["gunicorn_ext.state.redis"], out
    assert "pip install 'gunicorn-ext[socketio]'" in out["gunicorn_ext.socketio"], out
    assert out["memory"] == "v"
    version = _run([str(core_venv / "bin" / "gunicorn-ext"), "--version"], env=_clean_env())
    import gunicorn_ext

    assert version.stdout.strip() == f"gunicorn-ext {gunicorn_ext.__version__}"


@pytest.fixture
def example_from_wheel(full_venv: Path, tmp_path: Path) -> Iterator[Gunicorn]:
    """The example cluster, copied out of the tree, served by the wheel's gunicorn_ext."""
    app_dir = tmp_path / "flask_app"
    shutil.copytree(REPO / "examples" / "flask_app", app_dir,
                    ignore=shutil.ignore_patterns("state.db*", "__pycache__"))
    server = Gunicorn("app:app", config=app_dir / "cluster_conf.py", cwd=app_dir, workers=2,
                      log_dir=tmp_path, python=str(full_venv / "bin" / "python"),
                      env=_clean_env(SECRET_KEY="dist-test"))
    server.env = _clean_env(**{k: v for k, v in server.env.items()
                               if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    try:
        server.start().wait_ready(60)
        yield server
    finally:
        server.stop()


def test_example_runs_from_the_wheel(example_from_wheel: Gunicorn, full_venv: Path,
                                     tmp_path: Path) -> None:
    server = example_from_wheel
    base = f"http://{server.bind}"
    assert requests.get(f"{base}/healthz", timeout=10).text.strip() == "ok"
    cluster = wait_for(lambda: (c := requests.get(f"{base}/cluster", timeout=10).json())
                       and len(c["workers"]) == 2 and c, 30, what="two workers in /cluster")
    assert cluster["primary_pid"] == server.master_pid

    # The installed modules, not the tree's, served it.
    where = _run([str(full_venv / "bin" / "python"), "-c",
                  "import gunicorn_ext.state.flask as f; print(f.__file__)"],
                 cwd=tmp_path, env=_clean_env()).stdout.strip()
    assert str(full_venv) in where and str(REPO) not in where, where

    cli = str(full_venv / "bin" / "gunicorn-ext")
    status = json.loads(_run([cli, "status", "--json"], env=server.env).stdout)
    assert sorted(w["slot"] for w in status["workers"] if w["state"] == "ready") == [0, 1]

    site = tmp_path / "site.conf"
    rendered = _run([cli, "nginx", "render", "--backend", server.bind,
                     "--listen", str(free_port()), "--server-name", "example.test"])
    site.write_text(rendered.stdout)
    check = subprocess.run([cli, "nginx", "check", str(site)], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL,
                           env=_clean_env(PATH=os.environ.get("PATH", "") + ":/usr/sbin"))
    assert check.returncode == 0, check.stdout + check.stderr
