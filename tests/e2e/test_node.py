"""`hack/cluster up` with a real node, and `down` leaving the machine as it was.

One test walks the whole life of a node in a state dir of its own: snapshot of the host →
`up` (node Ready, a pod runs on the pod range, `kubectl exec`/`logs` reach the kubelet) → a
second cluster dir gets the API-server-only cluster and says why, and its `down` leaves the
first one's node alone → `down` → the host snapshot is the same as before.

The host may run other things that touch the same places (k3s, kubeadm, Docker): `down` undoes
only what `up` did, so a KUBE-* chain, a file in the node's directories or a kernel setting
that someone else made stays as they left it; and `up` refuses to start a node beside another
kubelet or kube-proxy.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from host_state import snapshot

HACK_CLUSTER = Path(__file__).resolve().parents[2] / "hack" / "cluster"
NODE_LOCK = Path("/run/reranker-fleet-node.lock")
POD_CIDR = ipaddress.ip_network("198.18.64.0/24")


def hack(state_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HACK_CLUSTER), *args], capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, RERANKER_CLUSTER_DIR=str(state_dir)))


def kubectl(info: dict, *args: str, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], *args],
                       capture_output=True, text=True, input=stdin, timeout=120)
    assert not check or r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
    return r


def node_lock_holder() -> str | None:
    """Who holds the machine's node, or None when it is free."""
    if not NODE_LOCK.exists():
        return None
    with open(NODE_LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return NODE_LOCK.read_text().strip() or "(unknown)"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


PAUSE_POD = """
apiVersion: v1
kind: Pod
metadata: {name: probe}
spec:
  containers:
  - name: pause
    image: reranker-fleet/pause:3.10.1
    imagePullPolicy: Never
"""


def skip_unless_the_node_is_free() -> None:
    if os.geteuid() != 0:
        pytest.skip("a node needs root")
    holder = node_lock_holder()
    if holder:
        pytest.skip(f"this machine's node is in use by the cluster in {holder}")


@pytest.mark.own_node
def test_node_up_and_down_leaves_the_host_as_it_was(tmp_path: Path) -> None:
    skip_unless_the_node_is_free()
    first, second = tmp_path / "first", tmp_path / "second"
    before = snapshot(first)

    t0 = time.monotonic()
    up = hack(first, "up")
    took = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stderr
        print(f"hack/cluster up with a node: {took:.1f}s")
        info = json.loads((first / "cluster.json").read_text())
        assert info["node"]["ready"] is True, info["node"]
        node = json.loads(kubectl(info, "get", "node", info["node"]["name"], "-o",
                                  "json").stdout)
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready["Ready"] == "True", node["status"]["conditions"]

        # a pod runs on the pod range (`up` returned once the namespace's ServiceAccount, which
        # pods need, exists); the API server reaches its kubelet for exec and logs
        kubectl(info, "apply", "-f", "-", stdin=PAUSE_POD)
        kubectl(info, "wait", "--for=condition=Ready", "pod/probe", "--timeout=90s")
        pod = json.loads(kubectl(info, "get", "pod", "probe", "-o", "json").stdout)
        assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_CIDR, pod["status"]
        exec_out = kubectl(info, "exec", "probe", "--", "/pause", "-v").stdout
        assert "pause.c v3.10.1" in exec_out, exec_out
        kubectl(info, "logs", "probe")

        # the node is one per machine: a second cluster dir runs without one and says why
        other = hack(second, "up")
        assert other.returncode == 0, other.stderr
        other_info = json.loads((second / "cluster.json").read_text())
        assert other_info["node"]["ready"] is False
        assert str(first) in other_info["node"]["reason"], other_info["node"]
        assert f"no node: this machine's node belongs to the cluster in {first}" in other.stderr
        assert hack(second, "down").returncode == 0
        # ... and its `down` left the first cluster's node running
        assert hack(first, "status").returncode == 0
        kubectl(info, "exec", "probe", "--", "/pause", "-v")

        # images lost from the store (a full disk, a prune) are imported again by the next
        # `up`, though their archives did not change: the pause image is the pods' sandbox
        sock = ["ctr", "--address", str(first / "node" / "containerd.sock"), "-n", "k8s.io"]

        def images_in_store() -> list[str]:
            return subprocess.run([*sock, "images", "ls", "-q"], capture_output=True, text=True,
                                  check=True).stdout.split()

        refs = [r for r in images_in_store() if "/pause:" in r]
        assert refs
        kubectl(info, "delete", "pod", "probe", "--wait=true")
        subprocess.run([*sock, "images", "rm", *refs], capture_output=True, check=True)
        assert hack(first, "down").returncode == 0
        again = hack(first, "up")
        assert again.returncode == 0, again.stderr
        info = json.loads((first / "cluster.json").read_text())
        after_up = images_in_store()
        assert set(refs) <= set(after_up), after_up
        kubectl(info, "apply", "-f", "-", stdin=PAUSE_POD)
        kubectl(info, "wait", "--for=condition=Ready", "pod/probe", "--timeout=90s")
    finally:
        hack(second, "down")
        down = hack(first, "down")
    assert down.returncode == 0, down.stderr
    after = snapshot(first)
    assert before == after, "\n".join(before.diff(after))


def iptables(*args: str, check: bool = True) -> str:
    r = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    assert not check or r.returncode == 0, f"iptables {' '.join(args)}: {r.stderr}"
    return r.stdout


def kube_chains() -> set[str]:
    return {line.split()[1] for table in ("filter", "nat", "mangle", "raw")
            for line in iptables("-t", table, "-S").splitlines()
            if line.startswith("-N KUBE-")}


@pytest.mark.own_node
def test_down_undoes_only_what_up_did(tmp_path: Path) -> None:
    """Things someone else made before `up` or while the node ran: a KUBE-* chain with a rule
    jumping to it, an entry in a directory the node writes to (one that existed before, one
    that `up` made), a kernel setting written after `up`. `down` leaves each of them."""
    skip_unless_the_node_is_free()
    tag = secrets.token_hex(3)
    chain = f"KUBE-FOREIGN-TEST-{tag.upper()}"
    cni, logs = Path("/var/lib/cni"), Path("/var/log/containers")
    cni_existed, logs_existed = cni.exists(), logs.exists()
    before_up = cni / f"foreign-test-{tag}"
    while_up = logs / f"foreign-test-{tag}.log"
    panic = Path("/proc/sys/kernel/panic")
    panic_before = panic.read_text().strip()
    # not the value before `up`, nor the kubelet's (10)
    theirs = next(v for v in ("7", "8", "9") if v != panic_before)
    state = tmp_path / "c"
    iptables("-N", chain)
    iptables("-A", chain, "-j", "RETURN")
    iptables("-A", "FORWARD", "-j", chain)  # jumps to a chain that returns: changes nothing
    before_up.mkdir(parents=True)
    chains_before = kube_chains()
    try:
        up = hack(state, "up")
        assert up.returncode == 0, up.stderr
        assert json.loads((state / "cluster.json").read_text())["node"]["ready"] is True
        assert kube_chains() > chains_before  # the kubelet's and kube-proxy's
        assert logs.is_dir()
        while_up.write_text("a container log of someone else's\n")
        panic.write_text(theirs + "\n")

        down = hack(state, "down")
        assert down.returncode == 0, down.stderr
        print(down.stderr)
        assert kube_chains() == chains_before, "the node's KUBE-* chains are gone, no other"
        assert f"-A FORWARD -j {chain}" in iptables("-S", "FORWARD")
        assert before_up.is_dir()
        assert while_up.read_text() == "a container log of someone else's\n"
        if not logs_existed:
            assert f"WARNING: left {logs} (made by `up`)" in down.stderr, down.stderr
        assert panic.read_text().strip() == theirs, "down wrote back a setting changed since up"
    finally:
        hack(state, "down")
        panic.write_text(panic_before + "\n")
        iptables("-D", "FORWARD", "-j", chain, check=False)
        iptables("-F", chain, check=False)
        iptables("-X", chain, check=False)
        while_up.unlink(missing_ok=True)
        shutil.rmtree(before_up, ignore_errors=True)
        for path, existed in ((logs, logs_existed), (cni, cni_existed)):
            if not existed and path.is_dir() and not any(path.iterdir()):
                path.rmdir()


@pytest.mark.own_node
def test_up_refuses_to_start_a_node_beside_another_kubelet(tmp_path: Path) -> None:
    skip_unless_the_node_is_free()
    fake = tmp_path / "kubelet"  # a process named kubelet, as another node's would be
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "600"])
    state = tmp_path / "c"
    try:
        up = hack(state, "up")
    finally:
        proc.kill()
        proc.wait()
        hack(state, "down")
    assert up.returncode != 0, up.stderr
    assert (f"ERROR: refusing to start a node: another kubelet or kube-proxy runs on this host: "
            f"kubelet (pid {proc.pid}: {fake} 600)") in up.stderr, up.stderr
    assert subprocess.run(["ip", "link", "show", "rrf0"], capture_output=True).returncode != 0
    assert node_lock_holder() is None
