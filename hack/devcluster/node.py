"""The cluster's one node: the machine-wide lock, the kubelet, and bringing the node's parts
(scheduler, cluster DNS, containerd, kubelet, kube-proxy) up and down in order.

A node changes the machine (a bridge, iptables, cgroups, kernel settings), so only one cluster
dir on a machine may run one: `up` takes an exclusive flock on /run/reranker-fleet-node.lock and
hands the locked descriptor to the node's daemons, so the lock lives exactly as long as they do.
When the lock is held by another cluster dir, or this machine cannot run containers (not root,
packages missing, runc failing), `up` gives the API-server-only cluster and records why in
cluster.json (`node.reason`), which is what node-needing tests skip with. When another
kubelet or kube-proxy runs on the host (k3s, kubeadm, a node of another tool), `up` fails and
names it rather than start a second node beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import containerd, hoststate, images, network
from .apiserver import get_object
from .build import NODE
from .certs import client_kubeconfig, write_private
from .console import log, verbose
from .controllers import start_scheduler
from .dns import CLUSTER_DOMAIN, start_dns
from .processes import free_port, running, start, stop, wait_for

LOCK_PATH = Path(os.environ.get("RERANKER_NODE_LOCK", "/run/reranker-fleet-node.lock"))
NODE_NAME = "reranker-dev-node"


def unavailable(bins: dict[str, Path]) -> str | None:
    """Why this machine cannot run the node at all, or None."""
    if os.geteuid() != 0:
        return (f"not root (uid {os.geteuid()}): a node needs root for containerd, runc, "
                "a bridge and iptables")
    if missing := [n for n in NODE if n not in bins]:
        return f"no {', '.join(missing)} binaries (KUBEBUILDER_ASSETS has none)"
    if missing := containerd.missing_tools():
        return (f"missing Debian packages {', '.join(missing)}: run hack/install-system-deps "
                "as root")
    return None


#: Another Kubernetes node's programs (k3s runs the kubelet and kube-proxy in its own process).
OTHER_NODE_PROGRAMS = ("kubelet", "kube-proxy", "k3s-server", "k3s-agent")


def other_node() -> str | None:
    """Why this host already runs another node (a kubelet or kube-proxy that is not this
    dir's: with the lock held, no node of ours runs), or None. Two nodes on one host fight
    over iptables chains, cgroups and kernel settings, and `down` could not tell which
    chains were whose."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cmd = [c.decode(errors="replace") for c in (proc / "cmdline").read_bytes().split(b"\0")
                   if c]
            zombie = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            continue
        name = os.path.basename(cmd[0]) if cmd else comm
        if not zombie and (comm in OTHER_NODE_PROGRAMS or name in OTHER_NODE_PROGRAMS):
            found.append(f"{name} (pid {proc.name}: {' '.join(cmd)[:200]})")
    if not found:
        return None
    return (f"refusing to start a node: another kubelet or kube-proxy runs on this host: "
            f"{'; '.join(found)}. Two nodes on one host fight over iptables, cgroups and kernel "
            "settings; stop it first, or run `hack/cluster up --no-node` for the control plane "
            "alone")


def lock_owner() -> str:
    with contextlib.suppress(OSError):
        return LOCK_PATH.read_text().strip()
    return ""


def acquire_lock(d: Path) -> int | str:
    """The locked descriptor, or why the lock cannot be had."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (f"this machine's node belongs to the cluster in {lock_owner() or '(unknown)'} "
                f"(lock {LOCK_PATH}); run `hack/cluster down` there first")
    os.ftruncate(fd, 0)
    os.write(fd, f"{d}\n".encode())
    return fd


def _lock_held_by_other(d: Path) -> bool:
    try:
        fd = os.open(LOCK_PATH, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock_owner() != str(d)
    finally:
        os.close(fd)
    return False


def prepare(d: Path) -> tuple[str, str | None]:
    """Before the control plane starts: the pause image, a runc check, then the host changes
    the API server needs (the bridge it binds to). Return (sandbox image, reason or None)."""
    pause, _ = images.pause_binary()
    if reason := containerd.runc_check(d, pause):
        return "", reason
    name, _ = images.pause_image()
    (d / "node").mkdir(parents=True, exist_ok=True)
    hoststate.record(baseline_path(d))
    hoststate.claim(baseline_path(d))
    network.create_bridge()
    network.add_guard()
    return f"docker.io/{name}", None


def baseline_path(d: Path) -> Path:
    return d / "node" / "host-baseline.json"


def start_node(d: Path, bins: dict[str, Path], *, server: str, sandbox_image: str,
               lock_fd: int) -> dict[str, Any]:
    """Scheduler, containerd (images imported), kubelet, kube-proxy; wait for Ready."""
    node = d / "node"
    ports = {"kube_scheduler": free_port(), "dns_health": free_port(), "dns_ready": free_port(),
             "kubelet": free_port(),
             "kubelet_healthz": free_port(), "kube_proxy_healthz": free_port(),
             "kube_proxy_metrics": free_port()}
    t0 = time.monotonic()
    start_scheduler(d, bins["kube-scheduler"], server, ports["kube_scheduler"])
    start_dns(d, bins["coredns"], server=server, kubectl=bins["kubectl"],
              health_port=ports["dns_health"], ready_port=ports["dns_ready"])
    network.write_cni_config(node / "cni", node / "cni-ipam")
    config = containerd.write_config(d, sandbox_image=sandbox_image, cni_conf_dir=node / "cni")
    containerd.start_containerd(d, Path(_which("containerd")), config, pass_fds=(lock_fd,))
    _, pause_tar = images.pause_image()
    loaded = images.import_changed(d, [pause_tar, *images.cached_archives()])
    if loaded:
        log(f"imported into the node: {', '.join(loaded)}")
    kubelet = start_kubelet(d, bins["kubelet"], server=server, port=ports["kubelet"],
                            healthz_port=ports["kubelet_healthz"], lock_fd=lock_fd)
    wait_for(f"node {NODE_NAME} Ready", lambda: _node_ready(d, server), {"kubelet": kubelet},
             d, 120)
    network.start_kube_proxy(d, bins["kube-proxy"], server=server, node_name=NODE_NAME,
                             healthz_port=ports["kube_proxy_healthz"],
                             metrics_port=ports["kube_proxy_metrics"])
    if verbose():
        log(f"  node parts: {time.monotonic() - t0:.1f}s")
    return {"ready": True, "reason": None, "name": NODE_NAME, "ip": network.NODE_IP,
            "bridge": network.BRIDGE, "pod_cidr": network.POD_CIDR,
            "containerd_socket": str(containerd.socket_path(d)), "ports": ports}


def _which(name: str) -> str:
    return shutil.which(name) or name


def _node_ready(d: Path, server: str) -> tuple[bool, str]:
    obj = get_object(d, server, f"/api/v1/nodes/{NODE_NAME}")
    if obj is None:
        return False, "not registered yet"
    conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    ready = conds.get("Ready", {})
    return ready.get("status") == "True", f"Ready={ready.get('status')}: {ready.get('message')}"


def start_kubelet(d: Path, binary: Path, *, server: str, port: int, healthz_port: int,
                  lock_fd: int) -> subprocess.Popen[bytes]:
    node = d / "node"
    pki = d / "pki"
    kubeconfig = node / "kubelet.kubeconfig"
    write_private(kubeconfig, client_kubeconfig(server, pki, "kubelet"))
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{containerd.socket_path(d)}",
        "podLogsDir": str(node / "pod-logs"),
        "resolvConf": "",  # pods resolve through the cluster DNS only: nothing leaves
        "clusterDNS": [network.NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # the dev machine's disk is shared and fuller than a real node's: evict only when it
        # is really full, and lift the pressure taint soon after (default 5 min)
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"nodefs.available": "1Gi", "imagefs.available": "1Gi",
                         "memory.available": "100Mi"},
        "evictionPressureTransitionPeriod": "30s",
        "serializeImagePulls": False,
    }
    cfg = node / "kubelet.yaml"
    cfg.write_text(json.dumps(config, indent=2) + "\n")
    return start(d, "kubelet", binary, [
        f"--config={cfg}", f"--kubeconfig={kubeconfig}",
        f"--root-dir={node / 'kubelet'}", f"--cert-dir={node / 'kubelet-pki'}",
        f"--node-ip={network.NODE_IP}", f"--hostname-override={NODE_NAME}", "--v=1",
    ], pass_fds=(lock_fd,))


def teardown(d: Path) -> None:
    """Stop the node's daemons and undo every host change recorded at `up`. Safe to run on
    a half-started or crashed node; does nothing to a node another cluster dir owns."""
    stop(d, ("kube-proxy", "kubelet"), quiet=True)
    if "containerd" in running(d):
        containerd.remove_all_containers(d)
    stop(d, ("containerd", "coredns", "kube-scheduler"), quiet=True)
    containerd.kill_shims(d)
    baseline = hoststate.load(baseline_path(d))
    if baseline is None:
        return
    if _lock_held_by_other(d):
        log(f"WARNING: the machine's node now belongs to {lock_owner()}: left its host state "
            "alone")
        return
    hoststate.unmount_under(d / "node", containerd.root())
    hoststate.remove_cgroups("kubepods")
    network.remove_guard()
    network.delete_bridge()
    hoststate.restore(baseline, d)
    baseline_path(d).unlink()
