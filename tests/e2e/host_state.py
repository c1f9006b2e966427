"""A snapshot of the host state a Kubernetes node can change, to check that `hack/cluster down`
puts the machine back as it found it.

Compared as a whole, except things other programs on a shared dev machine change meanwhile
(named in FOREIGN): buildah/podman's own mounts and cgroups, network namespaces made with
`ip netns` and the veth pairs of tests/kube's stand-in Macs.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Kernel settings the kubelet, the bridge CNI plugin and kube-proxy are known to write.
SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/ipv4/conf/all/route_localnet", "net/netfilter/nf_conntrack_max",
           "net/netfilter/nf_conntrack_tcp_timeout_established",
           "net/netfilter/nf_conntrack_tcp_timeout_close_wait")
#: Paths the node's programs write whatever they are told.
PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
         "/run/containerd", "/opt/containerd", "/etc/kubernetes", "/var/lib/containerd",
         "/run/netns")
NETNS = Path("/run/netns")
NODE_PROGRAMS = {"containerd", "containerd-shim-runc-v2", "kubelet", "kube-proxy",
                 "kube-scheduler", "pause", "runc"}
FOREIGN = re.compile(r"^(/var/lib/containers/|/run/containers/|/run/user/|/run/netns/(?!cni-)"
                     r"|link:rrm\d+[hn]$|cgroup:.*/(libpod|buildah|machine\.slice))")


@dataclass(frozen=True)
class HostState:
    processes: frozenset[str]
    mounts: frozenset[str]
    links: frozenset[str]
    netfilter: str
    cgroups: frozenset[str]
    sysctls: tuple[tuple[str, str], ...]
    paths: frozenset[str]

    def diff(self, other: HostState) -> list[str]:
        out = []
        for name in ("processes", "mounts", "links", "cgroups", "paths"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: gone {sorted(a - b)}, new {sorted(b - a)}")
        if self.sysctls != other.sysctls:
            out.append(f"sysctls: {dict(self.sysctls)} -> {dict(other.sysctls)}")
        if self.netfilter != other.netfilter:
            out.append(f"netfilter before:\n{self.netfilter}\nafter:\n{other.netfilter}")
        return out


def _foreign(entry: str) -> bool:
    return bool(FOREIGN.search(entry))


def _processes(cluster_dir: Path) -> frozenset[str]:
    out = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(cmd[0].decode(errors="replace")) if cmd and cmd[0] else ""
        if str(cluster_dir).encode() in b" ".join(cmd) or name in NODE_PROGRAMS:
            out.add(f"{proc.name}:{name}")
    return frozenset(out)


def _mounts() -> frozenset[str]:
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    return frozenset(p for p in points if not _foreign(p))


def _links() -> frozenset[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return frozenset(n for n in names if not _foreign(f"link:{n}"))


def _netfilter() -> str:
    parts = []
    for cmd in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "tables"]):
        text = subprocess.run(cmd, capture_output=True, text=True).stdout
        text = re.sub(r"\[\d+:\d+\]", "", text)
        parts += [f"## {cmd[0]}", *(ln for ln in text.splitlines() if not ln.startswith("#"))]
    return "\n".join(parts)


def _cgroups() -> frozenset[str]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] not in ("cgroup", "cgroup2"):
            continue
        top = Path(fields[4])
        for child in top.iterdir():
            if child.is_dir():
                out.add(f"cgroup:{child}")
    return frozenset(c for c in out if not _foreign(c))


def snapshot(cluster_dir: Path) -> HostState:
    sysctls = []
    for name in SYSCTLS:
        try:
            sysctls.append((name, Path("/proc/sys", name).read_text().strip()))
        except OSError:
            continue
    paths = {p for p in PATHS if os.path.lexists(p)}
    if NETNS.is_dir():  # containerd's sandbox namespaces; the directory is shared
        paths |= {str(n) for n in NETNS.iterdir() if n.name.startswith("cni-")}
    return HostState(processes=_processes(cluster_dir), mounts=_mounts(), links=_links(),
                     netfilter=_netfilter(), cgroups=_cgroups(), sysctls=tuple(sysctls),
                     paths=frozenset(paths))
