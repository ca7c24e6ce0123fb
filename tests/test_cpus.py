"""Unit tests for gunicorn_ext.cpus against fake cgroup trees in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gunicorn_ext import cpus
from gunicorn_ext.cpus import affinity_cpus, cgroup_cpu_limit, usable_cpus


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend the affinity mask holds 64 CPUs so cgroup quotas are what limits."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    return 64


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_v2_quota(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu.max", "200000 100000")
    assert cgroup_cpu_limit(tmp_path, None) == 2
    assert usable_cpus(tmp_path, None) == 2


def test_v2_fractional_quota_rounds_up(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu.max", "150000 100000")
    assert usable_cpus(tmp_path, None) == 2
    write(tmp_path / "cpu.max", "10000 100000")
    assert usable_cpus(tmp_path, None) == 1


def test_v2_max_means_no_limit(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu.max", "max 100000")
    assert cgroup_cpu_limit(tmp_path, None) is None
    assert usable_cpus(tmp_path, None) == many_cpus


def test_v2_own_cgroup_and_ancestors(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu.max", "max 100000")
    write(tmp_path / "kubepods" / "cpu.max", "300000 100000")
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000")
    proc = tmp_path / "proc-self-cgroup"
    write(proc, "0::/kubepods/pod1")
    assert usable_cpus(tmp_path / "", proc) == 3


def test_v1_quota(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "400000")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert usable_cpus(tmp_path, None) == 4


def test_v1_combined_mount_and_own_cgroup(tmp_path: Path, many_cpus: int) -> None:
    mount = tmp_path / "cpu,cpuacct"
    write(mount / "cpu.cfs_quota_us", "-1")
    write(mount / "cpu.cfs_period_us", "100000")
    write(mount / "docker" / "abc" / "cpu.cfs_quota_us", "50000")
    write(mount / "docker" / "abc" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc-self-cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/")
    assert usable_cpus(tmp_path, proc) == 1


def test_v1_unlimited(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path, None) is None
    assert usable_cpus(tmp_path, None) == many_cpus


def test_no_cgroup_files(tmp_path: Path, many_cpus: int) -> None:
    assert cgroup_cpu_limit(tmp_path, None) is None
    assert usable_cpus(tmp_path, None) == many_cpus
    assert usable_cpus(tmp_path / "does-not-exist", tmp_path / "nor-this") == many_cpus


def test_affinity_smaller_than_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    write(tmp_path / "cpu.max", "800000 100000")
    assert usable_cpus(tmp_path, None) == 2


def test_malformed_files_are_ignored(tmp_path: Path, many_cpus: int) -> None:
    write(tmp_path / "cpu.max", "garbage")
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "x")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "0")
    assert usable_cpus(tmp_path, None) == many_cpus
    write(tmp_path / "cpu.max", "0 100000")
    assert usable_cpus(tmp_path, None) == many_cpus


def test_fallback_to_cpu_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert affinity_cpus() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    write(tmp_path / "cpu.max", "500000 100000")
    assert usable_cpus(tmp_path, None) == 5


def test_never_below_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(), raising=False)
    assert usable_cpus(tmp_path, None) == 1


def test_real_machine_is_sane() -> None:
    n = usable_cpus()
    assert 1 <= n <= (os.cpu_count() or n)
    assert cpus.DEFAULT_CGROUP_ROOT == "/sys/fs/cgroup"
