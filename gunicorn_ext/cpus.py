"""How many CPUs this process may actually use.

``os.cpu_count()`` reports the host's CPUs, which is the wrong number for sizing a
worker pool inside a container or under ``taskset``: the scheduler affinity mask and
the cgroup CPU bandwidth quota (``docker run --cpus``, Kubernetes ``limits.cpu``,
systemd ``CPUQuota=``) both cap what the process can use. :func:`usable_cpus` takes
the smallest of them.

Both cgroup layouts are understood:

* cgroup v2 (unified): ``<root>/cpu.max`` holds ``"<quota> <period>"`` or
  ``"max <period>"`` (no limit).
* cgroup v1: ``<root>/cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (also under
  ``cpu,cpuacct`` / ``cpuacct,cpu``); a quota of ``-1`` means no limit.

The process's own cgroup (from ``/proc/self/cgroup``) and each of its ancestors are
checked as well as the root, since a limit set on any ancestor applies. Missing or
unreadable files simply mean "no limit known".
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeAlias

__all__ = [
    "DEFAULT_CGROUP_ROOT",
    "DEFAULT_PROC_CGROUP",
    "affinity_cpus",
    "cgroup_cpu_limit",
    "usable_cpus",
]

#: Where cgroup file systems are mounted on Linux.
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
#: The file naming the cgroups the current process belongs to.
DEFAULT_PROC_CGROUP = "/proc/self/cgroup"

# Directory names under which the v1 ``cpu`` controller is commonly mounted.
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")

StrPath: TypeAlias = "str | os.PathLike[str]"


def affinity_cpus() -> int:
    """Return the number of CPUs in this process's scheduler affinity mask.

    Falls back to ``os.cpu_count()`` where ``sched_getaffinity`` does not exist
    (non-Linux), and to 1 if even that is unknown.
    """
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _read_text(path: Path) -> str | None:
    """Return the stripped contents of *path*, or ``None`` if it cannot be read."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _quota_to_cpus(quota: int, period: int) -> int | None:
    """Convert a bandwidth quota over a period into whole CPUs (rounded up).

    Returns ``None`` for "no limit" (a negative quota) or nonsensical values.
    """
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _parse_cpu_max(text: str) -> int | None:
    """Parse a cgroup v2 ``cpu.max`` value such as ``"200000 100000"`` or ``"max 100000"``."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return _quota_to_cpus(quota, period)


def _v2_limit(directory: Path) -> int | None:
    """Return the cgroup v2 CPU limit set in *directory*, if any."""
    text = _read_text(directory / "cpu.max")
    return None if text is None else _parse_cpu_max(text)


def _v1_limit(directory: Path) -> int | None:
    """Return the cgroup v1 CFS CPU limit set in *directory*, if any."""
    quota_text = _read_text(directory / "cpu.cfs_quota_us")
    period_text = _read_text(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        return _quota_to_cpus(int(quota_text), int(period_text))
    except ValueError:
        return None


def _own_cgroup_paths(proc_cgroup: StrPath | None) -> tuple[str | None, str | None]:
    """Return this process's (v2 path, v1 cpu-controller path) from ``/proc/self/cgroup``.

    Lines look like ``0::/user.slice/x.scope`` (v2) or ``4:cpu,cpuacct:/docker/abc`` (v1).
    """
    if proc_cgroup is None:
        return None, None
    text = _read_text(Path(proc_cgroup))
    if not text:
        return None, None
    v2_path: str | None = None
    v1_path: str | None = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy_id, controllers, path = fields
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    return v2_path, v1_path


def _self_and_ancestors(base: Path, relative: str | None) -> Iterator[Path]:
    """Yield ``base/relative``, then each parent directory up to and including *base*.

    Only directories under *base* are produced, whatever ``..`` the relative path holds.
    """
    yield base
    if not relative:
        return
    parts = [p for p in relative.split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), 0, -1):
        candidate = base.joinpath(*parts[:depth])
        if candidate.is_dir():
            yield candidate


def _min_limit(limits: Iterable[int | None]) -> int | None:
    """Return the smallest non-``None`` limit, or ``None`` if there is none."""
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def cgroup_cpu_limit(
    cgroup_root: StrPath = DEFAULT_CGROUP_ROOT,
    proc_cgroup: StrPath | None = DEFAULT_PROC_CGROUP,
) -> int | None:
    """Return the CPU limit imposed by cgroups, in whole CPUs, or ``None`` if unlimited.

    :param cgroup_root: where the cgroup file systems are mounted (a temp dir in tests).
    :param proc_cgroup: the file listing this process's cgroups, used to find its own
        cgroup below *cgroup_root*; ``None`` checks only the root (and v1 controller
        mount points directly under it).
    """
    root = Path(cgroup_root)
    v2_path, v1_path = _own_cgroup_paths(proc_cgroup)

    limits: list[int | None] = []
    # cgroup v2: the unified hierarchy is mounted at the root itself.
    limits.extend(_v2_limit(d) for d in _self_and_ancestors(root, v2_path))
    # cgroup v1: the cpu controller has its own mount point under the root; also accept
    # a root that *is* the cpu controller mount.
    limits.append(_v1_limit(root))
    for name in _V1_CPU_DIRS:
        mount = root / name
        if mount.is_dir():
            limits.extend(_v1_limit(d) for d in _self_and_ancestors(mount, v1_path))
    return _min_limit(limits)


def usable_cpus(
    cgroup_root: StrPath = DEFAULT_CGROUP_ROOT,
    proc_cgroup: StrPath | None = DEFAULT_PROC_CGROUP,
) -> int:
    """Return how many CPUs this process may actually use (never less than 1).

    The minimum of the scheduler affinity mask (``os.sched_getaffinity``, falling back
    to ``os.cpu_count()``) and any cgroup v1/v2 CPU bandwidth quota, rounded up to a
    whole CPU.

    :param cgroup_root: where the cgroup file systems are mounted; tests point it at a
        temporary directory holding fake ``cpu.max`` / ``cpu.cfs_*`` files.
    :param proc_cgroup: see :func:`cgroup_cpu_limit`.
    """
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    return max(1, cpus)
