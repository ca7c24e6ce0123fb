"""The deployment examples people copy (deploy/): a systemd unit, a Dockerfile and a
Kubernetes manifest, each linted here so a broken one fails the suite."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
EXAMPLE_GRACEFUL_TIMEOUT = 10  # examples/flask_app/cluster_conf.py's default
EXAMPLE_PORT = 8000


def _unit(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


def test_systemd_unit_reloads_rolling_and_stops_gracefully() -> None:
    keys = _unit((DEPLOY / "gunicorn-ext.service").read_text())
    assert keys["Type"] == ["notify"]  # Gunicorn's arbiter sends READY=1
    assert keys["KillMode"] == ["mixed"]  # TERM to the master only; it stops its workers
    assert keys["ExecReload"][0].endswith("gunicorn-ext reload --rolling")
    assert re.search(r"gunicorn -c cluster_conf.py app:app$", keys["ExecStart"][0])
    assert int(keys["TimeoutStopSec"][0]) > EXAMPLE_GRACEFUL_TIMEOUT
    runtime = keys["RuntimeDirectory"][0]
    assert f"XDG_RUNTIME_DIR=/run/{runtime}" in keys["Environment"]
    assert keys["RuntimeDirectoryMode"] == ["0700"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with the paths pointed at this checkout: no warning at all."""
    bin_dir = Path(sys.executable).parent
    text = (DEPLOY / "gunicorn-ext.service").read_text()
    text = text.replace("/srv/app/.venv/bin", str(bin_dir))
    text = text.replace("WorkingDirectory=/srv/app", f"WorkingDirectory={REPO / 'examples' / 'flask_app'}")
    text = re.sub(r"^(User|Group)=app$", r"\1=root", text, flags=re.M)
    unit = tmp_path / "gunicorn-ext-test.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if str(unit) in line or "gunicorn-ext-test" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_lint() -> None:
    steps = _dockerfile()
    base = next(rest for word, rest in steps if word == "FROM")
    assert ":" in base and not base.endswith(":latest"), f"pin the base image: {base}"
    words = [w for w, _ in steps]
    assert "HEALTHCHECK" in words
    user = [rest for word, rest in steps if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the app must not run as root"
    assert words.index("USER") < words.index("CMD")
    cmd = json.loads(next(rest for word, rest in steps if word == "CMD"))  # exec form
    assert cmd == ["gunicorn", "-c", "cluster_conf.py", "app:app"]
    for word, rest in steps:
        if word == "COPY":
            for source in rest.split()[:-1]:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), f"COPY source {source} missing"
    expose = [int(rest) for word, rest in steps if word == "EXPOSE"]
    assert expose == [EXAMPLE_PORT]
    assert re.search(r"useradd .*--uid (\d+)", (DEPLOY / "Dockerfile").read_text())


def test_kubernetes_manifest() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["terminationGracePeriodSeconds"] > EXAMPLE_GRACEFUL_TIMEOUT
    uid = int(re.search(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid}
    assert container["ports"][0]["containerPort"] == EXAMPLE_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        # The probes must not touch the store: a Redis outage must not restart every Pod.
        assert container[probe]["httpGet"]["path"] == "/healthz"
    app_source = (REPO / "examples" / "flask_app" / "app.py").read_text()
    assert '"/healthz"' in app_source
    env = {e["name"] for e in container["env"]}
    assert {"WORKERS", "STATE_URL", "SECRET_KEY"} <= env
    selector = kinds["Service"]["spec"]["selector"]
    assert selector == kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
