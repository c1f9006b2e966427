"""What a node changes on the host outside its state dir, recorded by `up` and undone by
`down`: exactly that and nothing else, so a host that also runs k3s, kubeadm or Docker keeps
what they made, whatever they do while the node runs.

The record (host-baseline.json in the node's state dir) is written before the first change,
and each change `up` makes itself is recorded before it is made, so a crashed `up` is undone by
`down` as completely as a clean one. It holds:

- what existed before: iptables chains, nftables tables, the node's directories;
- the kernel settings the node's programs write (the kubelet's tunables, the forwarding the
  bridge CNI plugin turns on for its gateway), which `up` writes itself first, each with its
  value before. `down` puts one back only while it still has the value `up` gave it: a value
  someone else wrote since is theirs and stays;
- the directories the node's programs write whatever they are told (the kubelet's container
  log links and device-plugin socket, the CNI result cache, containerd's shim sockets), which
  `up` makes when they are missing. `down` removes the node's leftovers in them (links into
  its state dir, cache entries of its sandboxes, the kubelet's socket), then the directories
  it made if nothing else is in them; anything else is someone else's and stays, named in a
  warning.

iptables: only KUBE-* chains new since the record (iptables.py); nftables: only tables new
since and empty (iptables-nft leaves empty tables behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import iptables
from .console import log

#: Written by the kubelet (setupKernelTunables: pkg/kubelet/cm/container_manager_linux.go) and
#: by the bridge CNI plugin (forwarding, for its gateway, at the first pod).
NODE_SETTINGS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                 "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                 "kernel/keys/root_maxbytes": "25000000", "net/ipv4/ip_forward": "1"}
#: Directories with hard-coded paths: the kubelet's container log links and its device-plugin
#: socket (at start), the CNI result cache of containerd's CRI plugin (at the first pod),
#: containerd's shim sockets (at the first container). The other well-known paths
#: (/var/log/pods, /run/netns, /etc/kubernetes, /opt/containerd) are configured away;
#: tests/e2e/test_node.py checks that they stay untouched.
NODE_DIRS = ("/var/log/containers", "/var/lib/kubelet", "/var/lib/cni", "/run/containerd")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _read_setting(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


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


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def record(path: Path) -> dict[str, Any]:
    """What exists before the node's first change."""
    baseline: dict[str, Any] = {
        "paths": [p for p in NODE_DIRS if os.path.lexists(p)],
        "nft_tables": _nft_tables(),
        "chains": iptables.chains(),
        "settings": {},  # name -> {"before": ..., "set": ...}: changed by `up`
        "made_dirs": [],  # made by `up`
    }
    _write(path, baseline)
    return baseline


def claim(path: Path) -> None:
    """Write the node's kernel settings and make its missing directories, recording each
    change before making it."""
    baseline = load(path)
    assert baseline is not None, path
    for name, value in NODE_SETTINGS.items():
        before = _read_setting(name)
        if before is None or before == value:
            continue
        baseline["settings"][name] = {"before": before, "set": value}
        _write(path, baseline)
        try:
            _sysctl_path(name).write_text(value + "\n")
        except OSError as e:  # the program that needs it says so when it starts
            log(f"WARNING: could not set {name.replace('/', '.')}={value}: {e}")
    for d in NODE_DIRS:
        if not os.path.lexists(d):
            baseline["made_dirs"].append(d)
            _write(path, baseline)
            os.makedirs(d, mode=0o755)


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
    bind-mounts its root dir onto itself; pod volumes, sandbox shm and network namespaces,
    rootfs overlays)."""
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


def _is_leftover(path: Path, state_dir: Path) -> bool:
    """The node's: a link into its state dir (the kubelet's container log links), a CNI
    result cache entry naming a sandbox of its own (their network namespaces are in the state
    dir), the kubelet's device-plugin registration socket (no other kubelet runs beside the
    node)."""
    if path.is_symlink():
        return os.readlink(path).startswith(f"{state_dir}/")
    if path.parent.name == "results" and path.is_file():
        with contextlib.suppress(OSError):
            return f'"{state_dir}/'.encode() in path.read_bytes()
        return False
    return path.parent.name == "device-plugins" and path.name == "kubelet.sock" and \
        path.is_socket()


def _remove_leftovers(root: Path, state_dir: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if _is_leftover(p, state_dir):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _remove_empty_dirs(root: Path) -> None:
    """rmdir the empty directories at and below root, deepest first; mount points stay."""
    mounts = set(_mount_points())
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: w[0].count("/"), reverse=True):
        if dirpath not in mounts:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _others(root: Path) -> list[str]:
    return sorted(str(Path(dp) / n) for dp, dns, fns in os.walk(root) for n in [*dns, *fns])


def restore(baseline: dict[str, Any], state_dir: Path) -> None:
    """Undo what the node did and only that: its iptables chains, new empty nftables tables,
    its leftovers and the directories `up` made, the kernel settings `up` changed that still
    have its value."""
    if "chains" in baseline:
        iptables.remove_new_chains(baseline["chains"])
    else:
        log("WARNING: the host record predates chain records: no KUBE-* chain removed")
    for table in set(_nft_tables()) - set(baseline["nft_tables"]):
        if _nft_table_empty(table):
            subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True)
    for d in NODE_DIRS:
        root = Path(d)
        if not root.is_dir() or root.is_symlink():
            continue
        _remove_leftovers(root, state_dir)
        if d in baseline.get("made_dirs", ()):
            _remove_empty_dirs(root)
            if root.exists():
                left = _others(root)
                log(f"WARNING: left {d} (made by `up`): it holds what this node did not make: "
                    f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    for name, change in baseline.get("settings", {}).items():
        now = _read_setting(name)
        if now == change["set"]:
            try:
                _sysctl_path(name).write_text(change["before"] + "\n")
            except OSError as e:
                log(f"WARNING: could not restore {name.replace('/', '.')}={change['before']}: {e}")
        elif now != change["before"]:
            log(f"left {name.replace('/', '.')}={now}: someone changed it since `up` set "
                f"{change['set']} (it was {change['before']} before `up`)")
