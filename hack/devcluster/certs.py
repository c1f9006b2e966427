"""The cluster's certificates (one dev CA, EC P-256, the openssl CLI) and kubeconfigs.

Every component authenticates with a client certificate whose subject Kubernetes' default RBAC
already knows (system:kube-controller-manager, system:kube-scheduler, system:kube-proxy,
system:node:<name> in system:nodes), so no bootstrap tokens or extra bindings are needed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

from .console import die

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
#: The first address of the Service range: the `kubernetes` Service, which pods dial.
KUBERNETES_SERVICE_IP = "198.19.0.1"


def openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def _issue(pki: Path, name: str, subj: str, *ext: str) -> None:
    """Key + certificate signed by the dev CA in one openssl call (OpenSSL >= 3.0)."""
    addext = [a for e in ("basicConstraints=CA:FALSE", *ext) for a in ("-addext", e)]
    openssl("req", "-x509", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", "3650", "-sha256", "-subj", subj, "-CA", "ca.crt", "-CAkey", "ca.key",
            *addext, cwd=pki)


def _client(pki: Path, name: str, subj: str) -> None:
    _issue(pki, name, subj, "extendedKeyUsage=clientAuth")


def issue_serving(pki: Path, name: str, sans: str) -> None:
    """A serving certificate from the dev CA (for a server the API server or tests dial)."""
    _issue(pki, name, f"/CN={name}", "extendedKeyUsage=serverAuth", f"subjectAltName={sans}")


def _front_proxy(pki: Path) -> None:
    """The aggregation layer's identity: the API server proxies /apis/<group> of an
    APIService (custom.metrics.k8s.io) with this client certificate, from a CA of its own that
    extension API servers trust only for that (--requestheader-client-ca-file)."""
    openssl("req", "-x509", "-new", *EC_KEY, "-keyout", "front-proxy-ca.key",
            "-out", "front-proxy-ca.crt", "-days", "3650", "-sha256",
            "-subj", "/CN=reranker-fleet-dev-front-proxy-ca", cwd=pki)
    openssl("req", "-x509", "-new", *EC_KEY, "-keyout", "front-proxy-client.key",
            "-out", "front-proxy-client.crt", "-days", "3650", "-sha256",
            "-subj", "/CN=front-proxy-client", "-CA", "front-proxy-ca.crt",
            "-CAkey", "front-proxy-ca.key", "-addext", "basicConstraints=CA:FALSE",
            "-addext", "extendedKeyUsage=clientAuth", cwd=pki)


def make_pki(pki: Path, *, node_ip: str | None = None, node_name: str | None = None) -> None:
    """CA, API server serving cert, admin and controller-manager client certs, the
    ServiceAccount signing key; with a node also its kubelet, scheduler and proxy certs."""
    if (pki / "done").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-new", *EC_KEY, "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "3650", "-sha256", "-subj", "/CN=reranker-fleet-dev-ca", cwd=pki)
    ips = ["127.0.0.1", KUBERNETES_SERVICE_IP, *([node_ip] if node_ip else [])]
    sans = ",".join([*(f"IP:{ip}" for ip in ips), "DNS:localhost", "DNS:kubernetes",
                     "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                     "DNS:kubernetes.default.svc.cluster.local"])
    _issue(pki, "apiserver", "/CN=kube-apiserver", "extendedKeyUsage=serverAuth",
           f"subjectAltName={sans}")
    _client(pki, "admin", "/O=system:masters/CN=admin")
    _client(pki, "kcm", "/CN=system:kube-controller-manager")
    _front_proxy(pki)
    if node_ip and node_name:
        _client(pki, "scheduler", "/CN=system:kube-scheduler")
        _client(pki, "kube-proxy", "/CN=system:kube-proxy")
        _client(pki, "coredns", "/CN=system:coredns")
        _client(pki, "kubelet", f"/O=system:nodes/CN=system:node:{node_name}")
        # the API server's identity towards kubelets (logs, exec, port-forward)
        _client(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        _issue(pki, "kubelet-serving", f"/CN={node_name}", "extendedKeyUsage=serverAuth",
               f"subjectAltName=IP:{node_ip},DNS:{node_name}")
    # service-account token signing key (RSA, the most widely supported)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", "sa.key", cwd=pki)
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for p in pki.iterdir():
        p.chmod(0o600)
    (pki / "done").write_text("")


def _b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def kubeconfig_text(server: str, ca: Path, user: str, auth: dict[str, str]) -> str:
    # JSON is valid YAML; kubectl reads it as a kubeconfig.
    return json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "reranker-dev", "cluster": {
            "server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": "reranker-dev", "context": {
            "cluster": "reranker-dev", "user": user, "namespace": "default"}}],
        "current-context": "reranker-dev",
        "preferences": {},
    }, indent=2) + "\n"


def client_kubeconfig(server: str, pki: Path, name: str) -> str:
    """A kubeconfig authenticating with the client certificate pki/<name>.crt."""
    return kubeconfig_text(server, pki / "ca.crt", name, {
        "client-certificate-data": _b64(pki / f"{name}.crt"),
        "client-key-data": _b64(pki / f"{name}.key")})


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
