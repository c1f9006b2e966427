"""What a node changes on the host outside its state dir, recorded before `up` and put back by
`down`: kernel settings the kubelet and the CNI plugins write, directories with hard-coded
paths, network namespaces, nftables tables, cgroups and mounts.

The record (host-baseline.json in the node's state dir) is written before the first change, so
a crashed `up` is undone by `down` as completely as a clean one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .console import log

#: Written by the kubelet (kernel tunables it insists on) and by the bridge CNI plugin /
#: kube-proxy (forwarding, bridge netfilter).
SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/ipv4/conf/all/route_localnet")
#: Hard-coded paths the kubelet, containerd and CNI write whatever their configuration says.
OUTSIDE_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
                 "/run/containerd", "/run/netns", "/opt/containerd", "/etc/kubernetes")
NETNS_DIR = Path("/run/netns")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _nft_tables() -> list[str]:
    if not shutil.which("nft"):
        return []
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    return sorted(line.removeprefix("table ").strip() for line in r.stdout.splitlines()
                  if line.startswith("table "))


def _nft_table_empty(table: str) -> bool:
    """No rules left, only (empty) chains: safe to delete even if shared."""
    r = subprocess.run(["nft", "list", "table", *table.split()], capture_output=True, text=True)
    skip = ("table ", "chain ", "type ", "}", "policy ")
    return r.returncode == 0 and not any(
        line.strip() and not line.strip().startswith(skip) for line in r.stdout.splitlines())


def _netns() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def record(path: Path) -> dict[str, Any]:
    baseline: dict[str, Any] = {
        "sysctls": {},
        "paths": [p for p in OUTSIDE_PATHS if os.path.lexists(p)],
        "nft_tables": _nft_tables(),
        "netns": _netns(),
    }
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            baseline["sysctls"][name] = _sysctl_path(name).read_text().strip()
    path.write_text(json.dumps(baseline, indent=2) + "\n")
    return baseline


def load(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        points.append(mp)
    return points


def unmount_under(*roots: Path) -> None:
    """Unmount everything mounted at or below the roots, deepest first (the kubelet
    bind-mounts its root dir onto itself; pod volumes, sandbox shm and rootfs overlays)."""
    prefixes = [str(r.resolve()) for r in roots]
    targets = sorted({mp for mp in _mount_points()
                      if any(mp == p or mp.startswith(p + "/") for p in prefixes)},
                     key=lambda m: m.count("/"), reverse=True)
    for mp in targets:
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def remove_cgroups(name: str = "kubepods") -> None:
    """rmdir the kubelet's cgroup tree in every hierarchy (v1 controllers, named, unified)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        top = Path(fields[4]) / name
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if top.exists():
            log(f"WARNING: could not remove the cgroup {top} (processes still in it?)")


def restore(baseline: dict[str, Any]) -> None:
    """Undo what the node left: new network namespaces, new nftables tables, new paths,
    changed kernel settings."""
    for name in set(_netns()) - set(baseline["netns"]):
        if not name.startswith("cni-"):  # containerd's sandboxes; others belong to others
            continue
        ns = NETNS_DIR / name
        subprocess.run(["umount", str(ns)], capture_output=True)
        with contextlib.suppress(OSError):
            ns.unlink()
    for table in set(_nft_tables()) - set(baseline["nft_tables"]):
        if _nft_table_empty(table):  # iptables-nft leaves empty tables behind
            subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True)
    for p in OUTSIDE_PATHS:
        if p in baseline["paths"] or not os.path.lexists(p):
            continue
        if p == str(NETNS_DIR):
            # shared with `ip netns` users: only an empty, unmounted directory goes
            if p not in _mount_points():
                with contextlib.suppress(OSError):
                    os.rmdir(p)
            continue
        if any(mp == p or mp.startswith(p + "/") for mp in _mount_points()):
            unmount_under(Path(p))
        shutil.rmtree(p, ignore_errors=True)
    for name, value in baseline["sysctls"].items():
        path = _sysctl_path(name)
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
        except OSError as e:
            log(f"WARNING: could not restore {name.replace('/', '.')}={value}: {e}")
