"""Development Kubernetes cluster: etcd + kube-apiserver + kube-controller-manager, and one
real node (kube-scheduler, containerd + runc, kubelet, kube-proxy) when the machine allows it.

The control plane listens on 127.0.0.1 (API server only) or on the node bridge's address
198.18.64.1 (with a node); pods and Services use 198.18.64.0/24 and 198.19.0.0/24, never
routed off the machine. State (certs, etcd data, logs, pids, kubeconfigs) lives in the cluster
dir (default: <repo>/.cluster, override with RERANKER_CLUSTER_DIR). Binaries are built once
from the pinned Go modules in hack/kube and hack/etcd and cached in
${XDG_CACHE_HOME:-$HOME/.cache}/reranker-fleet/, or taken from $KUBEBUILDER_ASSETS.

Usage:
  hack/cluster up [--no-node]          build if needed, start, write <dir>/kubeconfig; with a
                                       node unless --no-node or the machine cannot run one
                                       (then it says why, and cluster.json records it)
  hack/cluster down                    stop everything, undo the node's host changes, remove
                                       state (logs are kept)
  hack/cluster status                  JSON; exit 0 when running and ready
  hack/cluster build [--no-node]       only build/locate the binaries; print their paths
  hack/cluster load-images TAR...      import image archives into the node's containerd
  hack/cluster kubectl-path            print the path of the matching kubectl
  hack/cluster kubectl ARGS...         run kubectl against the cluster
  hack/cluster kubeconfig-for-sa NAMESPACE SA [--duration 1h]
                                       print a kubeconfig authenticating as a ServiceAccount
  hack/cluster env                     print `export KUBECONFIG=...` for eval
  hack/cluster metrics up|down|status  Prometheus + prometheus-adapter serving
                                       custom.metrics.k8s.io (HPAs on reranker_queue_depth);
                                       needs the node and PyYAML (run it with .venv/bin/python)
  hack/cluster metrics build           only build/locate their binaries; print their paths
Only the Python standard library and the openssl CLI are needed (plus Go to build; the node
needs root and the Debian packages hack/install-system-deps installs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import cluster, metrics
from .build import build
from .console import die
from .paths import cluster_dir


def _flag(rest: list[str], flag: str) -> tuple[bool, list[str]]:
    return flag in rest, [a for a in rest if a != flag]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "up":
        no_node, rest = _flag(rest, "--no-node")
        if rest:
            die(f"usage: hack/cluster up [--no-node] (got {' '.join(rest)})", 2)
        cluster.up(node=not no_node)
    elif cmd == "down":
        cluster.down()
    elif cmd == "status":
        ready, status = cluster.status()
        print(json.dumps(status, indent=2))
        return 0 if ready else 1
    elif cmd == "build":
        no_node, rest = _flag(rest, "--no-node")
        for n, p in sorted(build(node=not no_node).items()):
            print(f"{n}\t{p}")
    elif cmd == "load-images":
        if not rest:
            die("usage: hack/cluster load-images TAR...", 2)
        cluster.load_images([Path(t) for t in rest])
    elif cmd == "kubectl-path":
        print(cluster.kubectl_path())
    elif cmd == "kubectl":
        info = cluster.require_up(cluster_dir())
        os.execv(info["kubectl"], [info["kubectl"], "--kubeconfig", info["kubeconfig"], *rest])
    elif cmd == "kubeconfig-for-sa":
        duration = "1h"
        if "--duration" in rest:
            i = rest.index("--duration")
            duration = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        if len(rest) != 2:
            die("usage: hack/cluster kubeconfig-for-sa NAMESPACE SA [--duration 1h]", 2)
        sys.stdout.write(cluster.kubeconfig_for_sa(rest[0], rest[1], duration))
    elif cmd == "metrics":
        d = cluster_dir()
        if rest == ["up"]:
            print(json.dumps(metrics.up(d, cluster.require_up(d)), indent=2))
        elif rest == ["down"]:
            metrics.down(d)
        elif rest == ["build"]:
            for n, p in sorted(metrics.binaries().items()):
                print(f"{n}\t{p}")
        elif rest == ["status"]:
            state = metrics.read_info(d)
            print(json.dumps(state, indent=2))
            return 0 if state else 1
        else:
            die("usage: hack/cluster metrics up|down|status|build", 2)
    elif cmd == "env":
        print(f"export KUBECONFIG={cluster_dir() / 'kubeconfig'}")
    else:
        die(f"unknown command {cmd!r}; see hack/cluster --help", 2)
    return 0
