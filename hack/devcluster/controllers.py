"""kube-controller-manager and, with a node, kube-scheduler: both on loopback, no leader
election, each with its own client certificate (the subjects default RBAC knows)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .apiserver import SERVICE_CIDR, insecure_ssl, wait_healthz
from .certs import client_kubeconfig, write_private
from .processes import start


def start_controller_manager(d: Path, binary: Path, server: str,
                             port: int) -> subprocess.Popen[bytes]:
    pki = d / "pki"
    cfg = d / "kcm.kubeconfig"
    write_private(cfg, client_kubeconfig(server, pki, "kcm"))
    proc = start(d, "kube-controller-manager", binary, [
        f"--kubeconfig={cfg}", f"--authentication-kubeconfig={cfg}",
        f"--authorization-kubeconfig={cfg}",
        "--bind-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={pki / 'kcm-serving'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        "--use-service-account-credentials=true",
        "--controllers=*", "--leader-elect=false",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--profiling=false",
        # HPAs act within seconds on a dev cluster (default 15 s); their scale-down
        # stabilization is each HPA's own `behavior`.
        "--horizontal-pod-autoscaler-sync-period=5s",
    ])
    wait_healthz(d, "kube-controller-manager", f"https://127.0.0.1:{port}/healthz",
                 insecure_ssl(), {"kube-controller-manager": proc})
    return proc


def start_scheduler(d: Path, binary: Path, server: str, port: int) -> subprocess.Popen[bytes]:
    pki = d / "pki"
    cfg = d / "node" / "scheduler.kubeconfig"
    write_private(cfg, client_kubeconfig(server, pki, "scheduler"))
    proc = start(d, "kube-scheduler", binary, [
        f"--kubeconfig={cfg}", f"--authentication-kubeconfig={cfg}",
        f"--authorization-kubeconfig={cfg}",
        "--bind-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={d / 'node' / 'scheduler-serving'}",
        "--leader-elect=false", "--profiling=false",
    ])
    wait_healthz(d, "kube-scheduler", f"https://127.0.0.1:{port}/healthz", insecure_ssl(),
                 {"kube-scheduler": proc})
    return proc
