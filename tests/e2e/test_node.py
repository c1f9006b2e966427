"""`hack/cluster up` with a real node, and `down` leaving the machine as it was.

One test walks the whole life of a node in a state dir of its own: snapshot of the host →
`up` (node Ready, a pod runs on the pod range, `kubectl exec`/`logs` reach the kubelet) → a
second cluster dir gets the API-server-only cluster and says why, and its `down` leaves the
first one's node alone → `down` → the host snapshot is the same as before.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
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


@pytest.mark.own_node
def test_node_up_and_down_leaves_the_host_as_it_was(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a node needs root")
    holder = node_lock_holder()
    if holder:
        pytest.skip(f"this machine's node is in use by the cluster in {holder}")
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
