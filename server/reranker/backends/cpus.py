"""How many CPUs this process may really use: what the inference runtimes should size for.

PyTorch and OpenVINO size their thread pools for the cores they see, but a Kubernetes pod with
`resources.limits.cpu: 2` on a 64-core node sees 64 cores and is allowed 2 CPUs' time by its
cgroup's CFS quota: 64 threads then take turns on 2 CPUs' time, and every layer waits for its
slowest, throttled thread. The budget is the affinity mask (cpusets, `taskset`) capped by the
cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up: what the JVM, Go's automaxprocs
and .NET do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _own(root: Path, controller: str | None) -> list[Path]:
    """This process's cgroup folder for the controller (v1) or the unified tree (v2, None), then
    the mount's root (in a container the mount usually is the container's own cgroup)."""
    folders = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if (controller is None and names == "") or (controller and controller in names.split(",")):
                base = root if controller is None else root / controller
                folders.append(base / path.lstrip("/"))
    except (OSError, ValueError):
        pass
    folders.append(root if controller is None else root / controller)
    return folders


def quota(root: Path = CGROUP) -> float | None:
    """CPUs' worth of time this process's cgroup allows (e.g. 2.5), or None when unlimited or
    unknown."""
    for folder in _own(root, None):  # cgroup v2: "<quota> <period>" or "max <period>"
        try:
            fields = (folder / "cpu.max").read_text().split()
        except OSError:
            continue
        return int(fields[0]) / int(fields[1]) if fields[0] != "max" else None
    for folder in _own(root, "cpu"):  # cgroup v1: a quota of -1 is unlimited
        try:
            q = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return q / period if q > 0 and period > 0 else None
    return None


def visible() -> int:
    """CPUs in this process's affinity mask (all of them where there is no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def budget(root: Path = CGROUP) -> int:
    """CPUs to size thread pools for: the visible ones, capped by the cgroup quota rounded up."""
    limit = quota(root)
    n = visible()
    return max(1, min(n, math.ceil(limit))) if limit else n


def capped(root: Path = CGROUP) -> int | None:
    """The budget when a quota makes it smaller than the visible CPUs (threads to set), else None
    (the runtimes' own sizing is right)."""
    n = budget(root)
    return n if n < visible() else None
