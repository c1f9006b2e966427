"""Building the pinned binaries from the Go modules in hack/kube and hack/etcd, once.

Control plane: kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes) and etcd.
Node: kubelet, kube-scheduler and kube-proxy from the same k8s.io/kubernetes module, so every
component carries the same version, and the cluster DNS (CoreDNS, hack/coredns). Binaries are
cached per version under the shared cache (`<cache>/<component>/<version>/bin`); a file lock
serialises builds of several clones. $KUBEBUILDER_ASSETS replaces the build with prebuilt binaries.
"""

from __future__ import annotations

import fcntl
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .console import die, log
from .paths import COREDNS_MOD, ETCD_MOD, KUBE_MOD, cache_root

CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kubectl", "etcd")
NODE = ("kube-scheduler", "kubelet", "kube-proxy", "coredns")


def required_version(gomod: Path, module: str) -> str:
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", gomod.read_text(), re.M)
    if not m:
        die(f"cannot find {module} in {gomod}")
    return m.group(1)


def kube_version() -> str:
    return required_version(KUBE_MOD / "go.mod", "k8s.io/kubernetes")


def etcd_version() -> str:
    return required_version(ETCD_MOD / "go.mod", "go.etcd.io/etcd/server/v3")


def coredns_version() -> str:
    return required_version(COREDNS_MOD / "go.mod", "github.com/coredns/coredns")


def kube_bin_dir() -> Path:
    return cache_root() / "kube" / kube_version() / "bin"


def etcd_bin_dir() -> Path:
    return cache_root() / "etcd" / etcd_version() / "bin"


def coredns_bin_dir() -> Path:
    return cache_root() / "coredns" / coredns_version() / "bin"


def _version_ldflags(version: str) -> str:
    m = re.match(r"v(\d+)\.(\d+)\.", version)
    if not m:
        die(f"unexpected Kubernetes version {version!r}")
    major, minor = m.group(1), m.group(2)
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitCommit=0000000000000000000000000000000000000000",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _go_build(name: str, pkg: str, moddir: Path, out: Path, ldflags: str, logf: IO[str],
              tags: str = "") -> None:
    go = shutil.which("go") or ""
    if not go:
        die("Go is needed to build the cluster binaries (hack/kube/go.mod needs go >= 1.24, "
            "hack/etcd/go.mod go >= 1.26); or point KUBEBUILDER_ASSETS at prebuilt binaries")
    env = dict(os.environ, GOFLAGS="-mod=mod", CGO_ENABLED="0")
    jobs = os.environ.get("RERANKER_BUILD_JOBS", "2")
    tmp = out.with_name(out.name + ".tmp")
    cmd = [go, "build", "-p", jobs, "-v", "-trimpath", f"-ldflags={ldflags}",
           *([f"-tags={tags}"] if tags else []), "-o", str(tmp), pkg]
    logf.write(f"\n$ (cd {moddir} && {' '.join(cmd)})\n")
    logf.flush()
    start = last = time.monotonic()
    count = 0
    recent: list[str] = []
    proc = subprocess.Popen(cmd, cwd=moddir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.put(ln)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            logf.write(line)
            recent = (recent + [line.rstrip()])[-30:]
            count += 1
        now = time.monotonic()
        if now - last >= 20:
            last = now
            what = f"last: {recent[-1][:80]}" if recent else "resolving modules"
            log(f"  {name}: {count} packages compiled, {int(now - start)}s elapsed ({what})")
    rc = proc.wait()
    logf.flush()
    if rc != 0:
        for line in recent:
            print(f"    {line}", file=sys.stderr)
        die(f"building {name} failed (exit {rc}); full log: {logf.name}")
    tmp.replace(out)
    log(f"  {name}: built in {int(time.monotonic() - start)}s")


def _targets() -> dict[str, tuple[Path, str, Path]]:
    """name -> (bin dir, Go package, module dir), in build order: control plane first."""
    own = {"etcd": (etcd_bin_dir(), ".", ETCD_MOD),
           "coredns": (coredns_bin_dir(), ".", COREDNS_MOD)}
    return {name: own.get(name) or (kube_bin_dir(), f"k8s.io/kubernetes/cmd/{name}", KUBE_MOD)
            for name in (*CONTROL_PLANE, *NODE)}


def build(*, node: bool = True) -> dict[str, Path]:
    """Return {name: path} of the binaries, building what is missing.

    With node=False only the control plane (the four binaries of CONTROL_PLANE) is needed.
    """
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        return from_assets(Path(assets))
    wanted = (*CONTROL_PLANE, *NODE) if node else CONTROL_PLANE
    targets = {n: t for n, t in _targets().items() if n in wanted}
    paths = {n: d / n for n, (d, _, _) in targets.items()}
    if all(os.access(p, os.X_OK) for p in paths.values()):
        return paths
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".build.lock", "w") as lockf:
        if _locked(lockf):
            log(f"another build is running; waiting for the lock {lockf.name} ...")
        fcntl.flock(lockf, fcntl.LOCK_EX)
        missing = [n for n, p in paths.items() if not os.access(p, os.X_OK)]
        if not missing:
            return paths
        logpath = cache_root() / "build.log"
        log(f"building {', '.join(missing)} (kubernetes {kube_version()}, etcd {etcd_version()}, "
            f"coredns {coredns_version()}) into {cache_root()}")
        log("a cold build takes 6-25 min for the control plane and a few more for the node "
            f"on 2 cores, depending on load; full log: {logpath}")
        t0 = time.monotonic()
        with open(logpath, "a") as logf:
            for name in missing:
                bindir, pkg, moddir = targets[name]
                bindir.mkdir(parents=True, exist_ok=True)
                flags = _version_ldflags(kube_version()) if moddir == KUBE_MOD else "-s -w"
                _go_build(name, pkg, moddir, paths[name], flags, logf)
        log(f"build finished in {int(time.monotonic() - t0)}s")
    return paths


@dataclass(frozen=True)
class Target:
    """One more binary built like the cluster's (metrics.py: Prometheus, prometheus-adapter)."""

    name: str
    out: Path
    pkg: str
    moddir: Path
    tags: str = ""


def build_extra(targets: list[Target]) -> None:
    """Build the targets whose binary is missing, under the same lock and log as build()."""
    if all(os.access(t.out, os.X_OK) for t in targets):
        return
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".build.lock", "w") as lockf:
        if _locked(lockf):
            log(f"another build is running; waiting for the lock {lockf.name} ...")
        fcntl.flock(lockf, fcntl.LOCK_EX)
        logpath = cache_root() / "build.log"
        with open(logpath, "a") as logf:
            for t in targets:
                if os.access(t.out, os.X_OK):
                    continue
                log(f"building {t.name} from {t.moddir} into {t.out.parent}; full log: {logpath}")
                t.out.parent.mkdir(parents=True, exist_ok=True)
                _go_build(t.name, t.pkg, t.moddir, t.out, "-s -w", logf, tags=t.tags)


def _locked(lockf: IO[str]) -> bool:
    try:
        fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lockf, fcntl.LOCK_UN)
    return False


def from_assets(d: Path) -> dict[str, Path]:
    """Prebuilt binaries (setup-envtest's layout). Node binaries are used when present."""
    paths = {}
    for name in ("etcd", "kube-apiserver"):
        if not os.access(d / name, os.X_OK):
            die(f"KUBEBUILDER_ASSETS={d} has no executable {name}")
        paths[name] = d / name
    kcm = d / "kube-controller-manager"
    if os.access(kcm, os.X_OK):
        paths["kube-controller-manager"] = kcm
    else:
        log(f"WARNING: no kube-controller-manager in KUBEBUILDER_ASSETS={d}: running without it "
            "(no garbage collector, namespace deletion never finishes)")
    for name in NODE:
        if os.access(d / name, os.X_OK):
            paths[name] = d / name
    kubectl = str(d / "kubectl") if os.access(d / "kubectl", os.X_OK) else shutil.which("kubectl")
    if not kubectl:
        die(f"no kubectl in KUBEBUILDER_ASSETS={d} nor on PATH")
    paths["kubectl"] = Path(kubectl)
    return paths
