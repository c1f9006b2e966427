"""Where things live: the repository, the cluster's state dir and the shared binary cache.

The state dir (default <repo>/.cluster, RERANKER_CLUSTER_DIR overrides) belongs to one cluster;
the cache (${XDG_CACHE_HOME:-~/.cache}/reranker-fleet) is shared by every clone on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

HACK = Path(__file__).resolve().parent.parent
REPO = HACK.parent
KUBE_MOD = HACK / "kube"
ETCD_MOD = HACK / "etcd"
COREDNS_MOD = HACK / "coredns"


def cluster_dir() -> Path:
    d = os.environ.get("RERANKER_CLUSTER_DIR")
    return Path(d).resolve() if d else REPO / ".cluster"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reranker-fleet"
