"""The development cluster (hack/cluster) as pytest fixtures; tests/conftest.py registers them.

`kube_cluster` (session): a real control plane (etcd, kube-apiserver, kube-controller-manager)
with no node: `hack/cluster up --no-node` (which builds the pinned binaries on first use, see
docs/cluster.md) and `hack/cluster down` at the end of the session. If the cluster in the state
dir is already running (a developer ran `hack/cluster up`), it is reused and left running.
If the control plane cannot be built or started the fixture FAILS: these tests never skip.

`node_cluster` (session): a cluster with one real node (containerd, kubelet, kube-proxy) for
tests/e2e: the developer's running cluster when it has a node, else its own state dir
(`<state dir>-node`). The node is one per machine and needs root: when `up` could not start it
(another cluster dir holds it, no root, no working runc) the tests using it are skipped with the
reason `up` recorded; a node that should start but fails is a failure.

    def test_something(kube_cluster, kube_namespace):
        kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=manifest)
        out = kube_cluster.kubectl("get", "cm", "-n", kube_namespace, "-o", "name").stdout
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
HACK_CLUSTER = REPO / "hack" / "cluster"

T = TypeVar("T")


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; str() includes its stderr and stdout."""

    def __str__(self) -> str:
        return (f"kubectl {' '.join(self.cmd[1:])} exited {self.returncode}\n"
                f"stderr: {self.stderr}\nstdout: {self.stdout}")


class KubeCluster:
    """Handle on the running control plane. Never mutates os.environ."""

    def __init__(self, state_dir: Path, info: dict):
        self.dir = Path(state_dir)
        self.kubeconfig: str = info["kubeconfig"]
        self.kubectl_path: str = info["kubectl"]
        self.server: str = info["server"]
        self.controller_manager: bool = bool(info.get("controller_manager"))
        self.info = info

    def env(self, kubeconfig: Optional[str] = None) -> dict:
        """Environment for a subprocess talking to this cluster (KUBECONFIG set)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        return env

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True,
                kubeconfig: Optional[str] = None, timeout: float = 120
                ) -> subprocess.CompletedProcess:
        """Run kubectl as a user would (KUBECONFIG in its env); text mode, output captured.

        With check=True a non-zero exit raises KubectlError (message includes stderr).
        """
        cmd = [self.kubectl_path, *map(str, args)]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True,
                           env=self.env(kubeconfig), timeout=timeout)
        if check and r.returncode != 0:
            raise KubectlError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def install_crd(self, path: Path, name: str, timeout: float = 90) -> None:
        """Apply a CRD file and wait until `name` is Established. Right after `up` the API
        server may still answer 429 (storage initializing): the apply is retried too."""
        self.eventually(lambda: self.kubectl("apply", "-f", str(path)), timeout=30,
                        desc=f"{path.name} applied")
        self.wait_established(f"crd/{name}", timeout=timeout)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD (`crd/NAME`) is Established. `kubectl wait` fails at once, rather
        than waiting, while a just-(re)created CRD has no status conditions yet: retried."""
        self.eventually(lambda: self.kubectl("wait", "--for", "condition=Established",
                                             "--timeout", f"{int(timeout)}s", *crds),
                        timeout=timeout, desc=f"{', '.join(crds)} established")

    def table(self, *args: str) -> list[dict[str, str]]:
        """`kubectl get ARGS` as a user sees it, one dict per row (column name -> text). Cells are
        cut at the header's column starts, so an empty cell stays empty instead of shifting the
        rest of the row left."""
        header, *rows = self.kubectl("get", *args).stdout.splitlines()
        starts = [m.start() for m in re.finditer(r"\S+", header)]
        names = header.split()
        return [{name: row[a:b].strip() for name, a, b in zip(names, starts, [*starts[1:], None])}
                for row in rows]

    def get_json(self, *args: str, kubeconfig: Optional[str] = None) -> dict:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig).stdout)

    def apply(self, manifest: str, namespace: Optional[str] = None) -> subprocess.CompletedProcess:
        """`kubectl apply -f -` of a YAML/JSON string."""
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def mint_kubeconfig(self, namespace: str, service_account: str,
                        duration: str = "1h") -> str:
        """Write a kubeconfig authenticating as ServiceAccount namespace/service_account
        (a TokenRequest via `kubectl create token`); return its path."""
        r = subprocess.run([sys.executable, str(HACK_CLUSTER), "kubeconfig-for-sa", namespace,
                            service_account, "--duration", duration],
                           capture_output=True, text=True, env=_cluster_env(self.dir))
        if r.returncode != 0:
            raise RuntimeError(f"hack/cluster kubeconfig-for-sa failed: {r.stderr}")
        out = self.dir / "sa" / f"{namespace}.{service_account}.kubeconfig"
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(r.stdout)
        return str(out)

    @staticmethod
    def eventually(fn: Callable[[], T], timeout: float = 60, interval: float = 0.25,
                   desc: str = "condition") -> T:
        """Call fn until it returns a truthy value (returned) or timeout (AssertionError)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = fn()
                if last:
                    return last
            except (AssertionError, subprocess.CalledProcessError) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {desc}; "
                                     f"last: {last}")
            time.sleep(interval)


def _state_dir() -> Path:
    d = os.environ.get("RERANKER_CLUSTER_DIR")
    if d:
        base = Path(d).resolve()
    else:
        base = REPO / ".cluster"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # one control plane per xdist worker
        base = base.with_name(f"{base.name}-{worker}")
    return base


def _cluster_env(state_dir: Path) -> dict:
    return dict(os.environ, RERANKER_CLUSTER_DIR=str(state_dir))


def _hack(args: list, state_dir: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HACK_CLUSTER), *args], env=_cluster_env(state_dir),
                          text=True, **kw)


def _hack_live(args: list, state_dir: Path) -> tuple:
    """Run hack/cluster, echoing its progress (stderr) live; return (exit code, stderr)."""
    p = subprocess.Popen([sys.executable, str(HACK_CLUSTER), *args], env=_cluster_env(state_dir),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    assert p.stderr is not None
    for line in p.stderr:
        lines.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    return p.wait(), "".join(lines)


_build_error: list = []


def collection_finish(session) -> None:
    """Build (or find cached) binaries once, before any test runs, when a collected test uses
    a cluster: a cold build takes minutes and must not count against a per-test timeout
    (pytest-timeout). A failure is recorded and reported by the fixture as a test failure.
    The node's binaries are built only when a collected test uses `node_cluster`."""
    if session.config.option.collectonly or os.environ.get("KUBEBUILDER_ASSETS"):
        return
    used = {f for item in session.items for f in getattr(item, "fixturenames", ())}
    if not used & {"kube_cluster", "node_cluster"}:
        return
    args = ["build"] if "node_cluster" in used else ["build", "--no-node"]
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else _nullcontext():
        rc, err = _hack_live(args, _state_dir())
    if rc != 0:
        _build_error.append(f"hack/cluster build exited {rc}:\n"
                            + "\n".join(err.splitlines()[-40:]))


def _info(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}


def _session_cluster(pytestconfig, state_dir: Path, up_args: list) -> Iterator[KubeCluster]:
    """Reuse the cluster running in state_dir, or bring one up (and down at the end)."""
    if _build_error:
        pytest.fail("could not build the Kubernetes cluster binaries; see docs/cluster.md.\n"
                    + _build_error[0], pytrace=False)
    status = _hack(["status"], state_dir, capture_output=True)
    owned = status.returncode != 0
    if owned:
        # show build/start progress live, even under pytest's output capture
        capman = pytestconfig.pluginmanager.getplugin("capturemanager")
        t0 = time.monotonic()
        with capman.global_and_fixture_disabled() if capman else _nullcontext():
            print(f"\n[kube_cluster] hack/cluster {' '.join(up_args)} (state in {state_dir})",
                  file=sys.stderr, flush=True)
            rc, err = _hack_live(up_args, state_dir)
        if rc != 0:
            tail = "\n".join(err.splitlines()[-40:])
            pytest.fail(f"could not build/start the Kubernetes cluster "
                        f"(hack/cluster {' '.join(up_args)} exited {rc}); see docs/cluster.md."
                        f"\n{tail}", pytrace=False)
        print(f"[kube_cluster] up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    cluster = KubeCluster(state_dir, _info(state_dir))
    try:
        yield cluster
    finally:
        if owned:
            r = _hack(["down"], state_dir, capture_output=True)
            if r.returncode != 0:
                print(f"[kube_cluster] hack/cluster down failed: {r.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def kube_cluster(pytestconfig) -> Iterator[KubeCluster]:
    yield from _session_cluster(pytestconfig, _state_dir(), ["up", "--no-node"])


def node_state_dir() -> Path:
    """The developer's cluster when it runs with a node, else a state dir of the tests' own."""
    base = _state_dir()
    if _info(base).get("node", {}).get("ready") and \
            _hack(["status"], base, capture_output=True).returncode == 0:
        return base
    return base.with_name(f"{base.name}-node")


@pytest.fixture(scope="session")
def node_cluster(pytestconfig) -> Iterator[KubeCluster]:
    """A cluster with a Ready node; skipped, with `up`'s reason, where the machine has none."""
    gen = _session_cluster(pytestconfig, node_state_dir(), ["up"])
    cluster = next(gen)
    try:
        node = cluster.info.get("node") or {}
        if not node.get("ready"):
            why = node.get("reason") or f"the running cluster in {cluster.dir} has none"
            pytest.skip(f"no Kubernetes node: {why}")
        yield cluster
    finally:
        gen.close()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster, request) -> Iterator[str]:
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{stem}-{secrets.token_hex(3)}"
    kube_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kube_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                             check=False)
