"""`up`, `down` and `status` of one cluster dir: the control plane, and the node when the
machine allows one.

Start order: (node: no other kubelet or kube-proxy on the host, pause image, runc check, host
record, bridge and guard) → etcd → kube-apiserver →
kube-controller-manager → (node: kube-scheduler, CoreDNS, containerd, kubelet, kube-proxy). A failure
at any step tears down everything started so far, host changes included; a port taken between
picking and binding is retried with new ports.
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

from . import node as node_mod
from .apiserver import admin_ssl, https_get, start_apiserver, wait_healthz
from .build import build
from .certs import client_kubeconfig, kubeconfig_text, make_pki, write_private
from .console import die, log
from .controllers import start_controller_manager
from .etcd import start_etcd, wait_etcd
from .network import NODE_IP
from .paths import cluster_dir
from .processes import StartFailed, free_port, running, stop

NODE_PROCS = ("kube-scheduler", "coredns", "containerd", "kubelet", "kube-proxy")


def read_info(d: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((d / "cluster.json").read_text()))
    except (OSError, ValueError):
        return {}


def is_ready(d: Path) -> bool:
    info = read_info(d)
    procs = running(d)
    if not info or "etcd" not in procs or "kube-apiserver" not in procs:
        return False
    if info.get("controller_manager") and "kube-controller-manager" not in procs:
        return False
    if info.get("node", {}).get("ready") and not all(p in procs for p in NODE_PROCS):
        return False
    code, _ = https_get(info["server"] + "/readyz", admin_ssl(d))
    return code == 200


def up(*, node: bool) -> None:
    d = cluster_dir()
    d.mkdir(parents=True, exist_ok=True)
    # keep the whole state dir out of git without touching the root .gitignore
    (d / ".gitignore").write_text("# created by hack/cluster\n*\n")
    with open(d / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if is_ready(d):
            info = read_info(d)
            log(f"already up: {info['server']} (kubeconfig {d / 'kubeconfig'}); "
                f"{_node_summary(info.get('node', {}))}")
            return
        t_build = time.monotonic()
        bins = build(node=node)
        t0 = time.monotonic()
        if t0 - t_build > 1:
            log(f"binaries ready after {t0 - t_build:.0f}s")
        for attempt in range(1, 4):
            try:
                _start_all(d, bins, t0, node=node)
                return
            except StartFailed as e:
                _teardown(d)
                if not e.port_clash or attempt == 3:
                    die(str(e))
                log(f"{e}; a port was taken meanwhile, retrying with new ports")
            except BaseException:
                _teardown(d)
                raise


def _node_summary(node: dict[str, Any]) -> str:
    if node.get("ready"):
        return f"node {node['name']} Ready at {node['ip']} (pods on {node['pod_cidr']})"
    return f"no node: {node.get('reason') or 'API server only'}"


def _teardown(d: Path) -> None:
    """Stop whatever runs for this dir and undo the node's host changes."""
    if (d / "node").exists():
        node_mod.teardown(d)
    stop(d, quiet=True)


def _clean_state(d: Path) -> None:
    for sub in ("etcd-data", "run", "pki", "sa", "node", "logs"):
        shutil.rmtree(d / sub, ignore_errors=True)
    for f in ("kubeconfig", "kcm.kubeconfig", "cluster.json"):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()


def _claim_node(d: Path, bins: dict[str, Path]) -> tuple[int | None, str, str | None]:
    """(locked fd, sandbox image, None) when this dir gets the node, else (None, "", why)."""
    reason = node_mod.unavailable(bins)
    if reason:
        return None, "", reason
    got = node_mod.acquire_lock(d)
    if isinstance(got, str):
        return None, "", got
    if refusal := node_mod.other_node():
        os.close(got)
        die(refusal)
    try:
        sandbox_image, reason = node_mod.prepare(d)
    except BaseException:
        os.close(got)
        raise
    if reason:
        os.close(got)
        return None, "", reason
    return got, sandbox_image, None


def _start_all(d: Path, bins: dict[str, Path], t0: float, *, node: bool) -> None:
    # stale state from a crashed run: stop leftovers and start clean
    _teardown(d)
    _clean_state(d)
    pki = d / "pki"
    lock_fd: int | None = None
    sandbox_image = ""
    reason: str | None = "not requested (hack/cluster up --no-node)"
    if node:
        lock_fd, sandbox_image, reason = _claim_node(d, bins)
        if reason:
            log(f"no node: {reason}; starting the API server only")
    try:
        bind_ip = NODE_IP if lock_fd is not None else "127.0.0.1"
        etcd_client, etcd_peer, api_port, kcm_port = (free_port() for _ in range(4))
        server = f"https://{bind_ip}:{api_port}"
        etcd = start_etcd(d, bins["etcd"], etcd_client, etcd_peer)
        if lock_fd is not None:
            make_pki(pki, node_ip=NODE_IP, node_name=node_mod.NODE_NAME)  # while etcd starts
        else:
            make_pki(pki)
        wait_etcd(d, etcd, etcd_client)
        api = start_apiserver(d, bins["kube-apiserver"], etcd_port=etcd_client, port=api_port,
                              bind_ip=bind_ip, node=lock_fd is not None)
        wait_healthz(d, "kube-apiserver", server + "/readyz", admin_ssl(d),
                     {"kube-apiserver": api})
        write_private(d / "kubeconfig", client_kubeconfig(server, pki, "admin"))
        has_kcm = "kube-controller-manager" in bins
        kcm = None
        if has_kcm:
            kcm = start_controller_manager(d, bins["kube-controller-manager"], server, kcm_port)
        node_info: dict[str, Any] = {"ready": False, "reason": reason}
        if lock_fd is not None:
            node_info = node_mod.start_node(d, bins, server=server, sandbox_image=sandbox_image,
                                            lock_fd=lock_fd)
        if kcm is not None:
            # A pod is refused until its namespace's default ServiceAccount exists, which the
            # controller-manager makes a moment after it starts: `up` returns once `kubectl
            # apply` of a pod in `default` works (a fast machine got "serviceaccount not found").
            wait_healthz(d, "the default ServiceAccount",
                         server + "/api/v1/namespaces/default/serviceaccounts/default", admin_ssl(d),
                         {"kube-controller-manager": kcm}, timeout=60)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # the node's daemons hold the lock from here on

    bindir = d / "bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "kubectl"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(bins["kubectl"])
    info = {
        "server": server, "kubeconfig": str(d / "kubeconfig"),
        "kubectl": str(bins["kubectl"]), "controller_manager": has_kcm,
        "node": node_info,
        "ports": {"etcd": etcd_client, "etcd_peer": etcd_peer, "apiserver": api_port,
                  "kube_controller_manager": kcm_port if has_kcm else None},
        "binaries": {k: str(v) for k, v in bins.items()},
        "started_at": time.time(),
    }
    (d / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"up in {time.monotonic() - t0:.1f}s: {server}; {_node_summary(node_info)}")
    log(f"  kubectl --kubeconfig {d / 'kubeconfig'} get ns   (kubectl: {link})")


def down() -> None:
    d = cluster_dir()
    if not d.exists():
        log("nothing to stop")
        return
    with open(d / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        procs = running(d)
        _teardown(d)
        for name, pid in procs.items():
            log(f"stopped {name} (pid {pid})")
        left = running(d)
        if left:
            die(f"still running: {left}")
        for p in d.iterdir():
            if p.name in ("logs", ".lock", ".gitignore"):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
    log(f"down; logs kept in {d / 'logs'}")


def status() -> tuple[bool, dict[str, Any]]:
    d = cluster_dir()
    ready = is_ready(d)
    return ready, {"ready": ready, "running": running(d), **read_info(d)}


def require_up(d: Path) -> dict[str, Any]:
    info = read_info(d)
    if not info or not running(d).get("kube-apiserver"):
        die(f"the cluster in {d} is not running; run hack/cluster up")
    return info


def kubectl_path() -> Path:
    info = read_info(cluster_dir())
    if info.get("kubectl"):
        return Path(info["kubectl"])
    return build(node=False)["kubectl"]


def kubeconfig_for_sa(namespace: str, sa: str, duration: str) -> str:
    d = cluster_dir()
    info = require_up(d)
    r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], "create", "token",
                        sa, "-n", namespace, f"--duration={duration}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        die(f"kubectl create token {sa} -n {namespace}: {r.stderr.strip()}")
    cfg = json.loads(kubeconfig_text(info["server"], d / "pki" / "ca.crt",
                                     f"system:serviceaccount:{namespace}:{sa}",
                                     {"token": r.stdout.strip()}))
    cfg["contexts"][0]["context"]["namespace"] = namespace
    return json.dumps(cfg, indent=2) + "\n"


def load_images(tars: list[Path]) -> None:
    """Import image archives into this cluster's node; a no-op, said so, without one."""
    from . import images

    d = cluster_dir()
    missing = [str(t) for t in tars if not t.is_file()]
    if missing:
        die(f"no such archive: {', '.join(missing)}")
    info = read_info(d)
    node = info.get("node", {})
    if not node.get("ready") or "containerd" not in running(d):
        why = node.get("reason") if info else "the cluster is not running"
        log(f"no node runs in {d} ({why or 'not up'}): nothing loaded. `hack/cluster up` "
            f"imports the archives in {images.images_dir()} when it starts the node.")
        return
    t0 = time.monotonic()
    names = images.import_changed(d, [t.resolve() for t in tars], force=True)
    log(f"loaded {', '.join(names) or 'nothing new'} into the node "
        f"in {time.monotonic() - t0:.1f}s")
