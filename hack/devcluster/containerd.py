"""containerd for the node: Debian's containerd and runc, with the CRI plugin.

Its socket and runtime state (sandbox network namespaces and runc's state included) live in
the node's state dir; only its shims' sockets go where containerd 1.6 hard-codes them
(/run/containerd/s). Its root (image content and
unpacked snapshots) in the shared cache, so images imported once (`hack/cluster load-images`,
`make images`) survive `down` like the built binaries do. Only one node runs on a machine at a
time (see node.py), so the root is never shared by two containerds.

Settings this machine needs (see docs/cluster.md): `restrict_oom_score_adj` (root lacks
CAP_SYS_RESOURCE here, so lowering oom_score_adj fails), no AppArmor, cgroupfs (no systemd),
the local pause image as sandbox image, the Debian CNI plugins with a config dir of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .console import log
from .paths import cache_root
from .processes import start, wait_for

CNI_BIN_DIR = Path("/usr/lib/cni")
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace: what the kubelet sees


def root() -> Path:
    return cache_root() / "containerd"


def state_dir(d: Path) -> Path:
    return d / "node" / "containerd"


def socket_path(d: Path) -> Path:
    return d / "node" / "containerd.sock"


def missing_tools() -> list[str]:
    """Debian packages the node needs that are not installed."""
    need = {"containerd": "containerd", "ctr": "containerd", "runc": "runc",
            "iptables": "iptables", "conntrack": "conntrack", "nft": "nftables",
            "gcc": "gcc", "buildah": "buildah", "ip": "iproute2"}
    missing = sorted({pkg for tool, pkg in need.items() if not shutil.which(tool)})
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append("containernetworking-plugins")
    return missing


def write_config(d: Path, *, sandbox_image: str, cni_conf_dir: Path) -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    toml = f"""# written by hack/cluster
version = 2
root = {json.dumps(str(root()))}
state = {json.dumps(str(state_dir(d)))}
# opt would install into /opt/containerd; the others are snapshotters this node does not use
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = {json.dumps(str(socket_path(d)))}

[metrics]
  address = ""

[{cri}]
  sandbox_image = {json.dumps(sandbox_image)}
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # sandbox network namespaces in the state dir, not /run/netns (shared with `ip netns` users)
  netns_mounts_under_state_dir = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  # runc's state in the state dir, not /run/containerd/runc
  Root = {json.dumps(str(state_dir(d) / "runc"))}

[{cri}.cni]
  bin_dir = {json.dumps(str(CNI_BIN_DIR))}
  conf_dir = {json.dumps(str(cni_conf_dir))}
  max_conf_num = 1
"""
    path = d / "node" / "containerd.toml"
    path.write_text(toml)
    return path


def start_containerd(d: Path, binary: Path, config: Path, *,
                     pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    root().mkdir(parents=True, exist_ok=True)
    log_file = d / "logs" / "containerd.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    proc = start(d, "containerd", binary, ["--config", str(config)], pass_fds=pass_fds)

    def serving() -> tuple[bool, str]:
        # The CRI plugin answers "server is not initialized yet" until it has started its
        # streaming server, a moment after containerd serves its socket; a kubelet started in
        # between exits at once. containerd 1.6 logs that step; ctr cannot ask the CRI API.
        r = ctr(d, "version", check=False)
        if r.returncode != 0:
            return False, r.stderr.strip()
        with open(log_file, "rb") as f:
            f.seek(offset)
            return b"Start streaming server" in f.read(), "the CRI plugin is starting"

    wait_for("containerd", serving, {"containerd": proc}, d, 60)
    return proc


def ctr(d: Path, *args: str, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = ["ctr", "--address", str(socket_path(d)), "--namespace", NAMESPACE, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
    return r


def runc_check(d: Path, pause: Path) -> str | None:
    """Start one container with runc (the static pause binary printing its version); return
    why that fails, or None. Catches a machine without namespaces/cgroups for root."""
    bundle = d / "node" / "runc-check"
    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "rootfs").mkdir(parents=True)
    shutil.copy2(pause, bundle / "rootfs" / "pause")
    r = subprocess.run(["runc", "spec", "--bundle", str(bundle)], capture_output=True, text=True)
    if r.returncode != 0:
        return f"runc spec failed: {r.stderr.strip()}"
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["/pause", "-v"], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"rrf-runc-check-{os.getpid()}"
    try:
        r = subprocess.run(["runc", "--root", str(bundle / "state"), "run", "--bundle",
                            str(bundle), cid], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "runc could not start a container within 60 s"
    finally:
        subprocess.run(["runc", "--root", str(bundle / "state"), "delete", "--force", cid],
                       capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)
    if r.returncode != 0 or "pause" not in r.stdout:
        return (f"runc cannot start a container here (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[-300:]}")
    return None


def remove_all_containers(d: Path) -> None:
    """Kill every task and delete every container (and its snapshot) of the CRI namespace.

    `down` does this rather than asking the kubelet to drain: it works whatever state the
    kubelet or the API server are in. Sandbox network namespaces are removed afterwards."""
    r = ctr(d, "tasks", "ls", "-q", check=False)
    tasks = r.stdout.split() if r.returncode == 0 else []
    for task in tasks:
        ctr(d, "tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 15
    for task in tasks:
        while ctr(d, "tasks", "delete", task, check=False).returncode != 0 and \
                time.monotonic() < deadline and task in ctr(d, "tasks", "ls", "-q").stdout.split():
            time.sleep(0.2)
    r = ctr(d, "containers", "ls", "-q", check=False)
    for cid in (r.stdout.split() if r.returncode == 0 else []):
        ctr(d, "containers", "delete", cid, check=False)


def kill_shims(d: Path) -> None:
    """containerd-shim-runc-v2 processes outlive containerd by design; ours name our socket."""
    sock = str(socket_path(d)).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock in cmd:
                os.kill(int(proc.name), signal.SIGKILL)
                log(f"killed a leftover containerd shim (pid {proc.name})")
