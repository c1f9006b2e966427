"""The cluster DNS: CoreDNS (hack/coredns) as a host process on the node bridge's address.

Pods get it as their nameserver (the kubelet's clusterDNS), so Service names resolve as on any
cluster (`redis://NAME-redis:6379` in a pod). It reads Services and EndpointSlices as the user
system:coredns (its client certificate) with the read-only ClusterRole applied here, the same
rules the upstream CoreDNS deployment grants.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from .certs import client_kubeconfig, write_private
from .console import die
from .network import NODE_IP
from .processes import start, wait_for

USER = "system:coredns"
CLUSTER_DOMAIN = "cluster.local"
RBAC = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "reranker-dev:coredns"},
     "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"]},
               {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "reranker-dev:coredns"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                 "name": "reranker-dev:coredns"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]},
]


def start_dns(d: Path, binary: Path, *, server: str, kubectl: Path, health_port: int,
              ready_port: int) -> subprocess.Popen[bytes]:
    node = d / "node"
    r = subprocess.run([str(kubectl), "--kubeconfig", str(d / "kubeconfig"), "apply",
                        "-f", "-"], input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": RBAC}),
                       capture_output=True, text=True)
    if r.returncode != 0:
        die(f"applying the cluster DNS's RBAC failed: {r.stderr.strip()}")
    kubeconfig = node / "coredns.kubeconfig"
    write_private(kubeconfig, client_kubeconfig(server, d / "pki", "coredns"))
    corefile = node / "Corefile"
    corefile.write_text(f""".:53 {{
    bind {NODE_IP}
    ready 127.0.0.1:{ready_port}
    health 127.0.0.1:{health_port}
    errors
    cache 5
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} reranker-dev
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
""")
    proc = start(d, "coredns", binary, ["-conf", str(corefile)])

    def ready() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/ready", timeout=1) as r:
                return r.status == 200, str(r.status)
        except OSError as e:
            return False, str(e)

    wait_for("the cluster DNS", ready, {"coredns": proc}, d, 60)
    return proc
