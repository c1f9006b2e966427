"""kube-apiserver, and the HTTPS client the other modules use to ask it things.

API-server-only clusters bind 127.0.0.1. With a node the API server binds and advertises the
node bridge's address instead: pods reach it through the `kubernetes` Service (its endpoint is
kept by the lease reconciler), and it dials the kubelet for logs/exec with its own client cert.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .processes import start, wait_for

SERVICE_CIDR = "198.19.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


def start_apiserver(d: Path, binary: Path, *, etcd_port: int, port: int, bind_ip: str,
                    node: bool) -> subprocess.Popen[bytes]:
    pki = d / "pki"
    args = [
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--bind-address={bind_ip}", f"--advertise-address={bind_ip}",
        f"--secure-port={port}",
        f"--cert-dir={pki}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        "--profiling=false",
        # The aggregation layer, for APIServices such as custom.metrics.k8s.io (metrics.py).
        # Aggregator routing dials the APIService's endpoint directly, not its ClusterIP: the
        # API server runs on the host, where no kube-proxy rule is needed for that.
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--enable-aggregator-routing=true",
    ]
    if node:
        args += [
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    else:
        # 127.0.0.1 cannot be the `kubernetes` Service's endpoint, and nothing would dial it
        args.append("--endpoint-reconciler-type=none")
    return start(d, "kube-apiserver", binary, args)


def admin_ssl(d: Path) -> ssl.SSLContext:
    pki = d / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def insecure_ssl() -> ssl.SSLContext:
    """For the components' self-signed /healthz endpoints on loopback."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def https_get(url: str, ctx: ssl.SSLContext, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return int(r.status), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ssl.SSLError) as e:
        return 0, str(e)


def get_object(d: Path, server: str, path: str) -> dict[str, Any] | None:
    """GET an API path as admin; None unless 200."""
    code, body = https_get(server + path, admin_ssl(d))
    return json.loads(body) if code == 200 else None


def wait_healthz(d: Path, name: str, url: str, ctx: ssl.SSLContext,
                 procs: dict[str, subprocess.Popen[bytes]], timeout: float = 120) -> None:
    def check() -> tuple[bool, str]:
        code, body = https_get(url, ctx)
        return code == 200, f"HTTP {code} {body}"

    wait_for(f"{name} {url.rsplit('/', 1)[-1]}", check, procs, d, timeout)
