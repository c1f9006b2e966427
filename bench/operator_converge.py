"""How fast does reranker-operator converge a fleet, and how quiet is it when idle?

Not a test: a measurement against the development control plane (hack/cluster; reused if it
is running, else started and stopped again). It runs the real operator as the ServiceAccount
of operator/rbac/, and counts that identity's API requests on the API server itself through
API Priority and Fairness: two FlowSchemas match the operator's ServiceAccount (one for write
verbs, one for everything else), and `apiserver_flowcontrol_dispatched_requests_total` per
FlowSchema counts what it sent, Kopf's own requests (annotations, events, watches) included.

    .venv/bin/python bench/operator_converge.py [--count 200] [--idle-seconds 60]

Prints: the time for one RerankerDeployment to converge (the baseline), the time for COUNT
of them (created at once from 8 client threads), the ratio per resource, API writes while
converging, API writes (and other requests) per minute of the idle operator (the target is 0
writes), and the writes of a restart with everything in place (the target is 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
HACK_CLUSTER = REPO / "hack" / "cluster"
OPERATOR_BIN = Path(sys.executable).parent / "reranker-operator"
MANAGED = "app.kubernetes.io/managed-by=reranker-operator"
CHILDREN_PER_RESOURCE = 5  # ConfigMap, Deployment, Service, HPA, PDB
SA = "reranker-operator"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self) -> None:
        self.dir = Path(os.environ.get("RERANKER_CLUSTER_DIR") or REPO / ".cluster")
        env = dict(os.environ, RERANKER_CLUSTER_DIR=str(self.dir))
        self.env = env
        self.owned = subprocess.run([sys.executable, str(HACK_CLUSTER), "status"], env=env,
                                    capture_output=True).returncode != 0
        if self.owned:
            # no node: the measured thing is the operator's API traffic, not pods starting
            log("starting the control plane (hack/cluster up --no-node)")
            subprocess.run([sys.executable, str(HACK_CLUSTER), "up", "--no-node"], env=env,
                           check=True)
        info = json.loads((self.dir / "cluster.json").read_text())
        self.kubeconfig, self.kubectl_path = info["kubeconfig"], info["kubectl"]

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: str | None = None,
                check: bool = True) -> str:
        r = subprocess.run([self.kubectl_path, *args], input=input, capture_output=True,
                           text=True, env=dict(os.environ,
                                               KUBECONFIG=kubeconfig or self.kubeconfig))
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr}")
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def mint_kubeconfig(self, namespace: str, sa: str) -> str:
        out = subprocess.run([sys.executable, str(HACK_CLUSTER), "kubeconfig-for-sa", namespace,
                              sa, "--duration", "2h"], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        path = self.dir / "sa" / f"bench.{namespace}.{sa}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out)
        path.chmod(0o600)
        return str(path)

    def down(self) -> None:
        if self.owned:
            subprocess.run([sys.executable, str(HACK_CLUSTER), "down"], env=self.env)


def rbac_and_flowschemas(cluster: Cluster, ns: str, tag: str) -> None:
    docs = []
    for path in sorted((REPO / "operator" / "rbac").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = ns
            else:
                doc["metadata"]["name"] = tag
                if doc["kind"] == "ClusterRoleBinding":
                    doc["roleRef"]["name"] = tag
                    doc["subjects"][0]["namespace"] = ns
            docs.append(doc)
    subject = [{"kind": "ServiceAccount", "serviceAccount": {"name": SA, "namespace": ns}}]
    every = {"apiGroups": ["*"], "resources": ["*"], "namespaces": ["*"],
             "clusterScope": True}
    for suffix, precedence, verbs in (("writes", 100, ["create", "update", "patch", "delete",
                                                       "deletecollection"]),
                                      ("reads", 101, ["*"])):
        rules = [{"subjects": subject, "resourceRules": [{**every, "verbs": verbs}]}]
        if suffix == "reads":
            rules[0]["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
        docs.append({"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
                     "metadata": {"name": f"{tag}-{suffix}"},
                     "spec": {"matchingPrecedence": precedence,
                              "priorityLevelConfiguration": {"name": "workload-low"},
                              "distinguisherMethod": {"type": "ByUser"}, "rules": rules}})
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def requests_by(cluster: Cluster, tag: str) -> dict[str, float]:
    """Requests dispatched so far per FlowSchema of this run (writes, reads)."""
    text = cluster.kubectl("get", "--raw", "/metrics")
    out = {"writes": 0.0, "reads": 0.0}
    for line in text.splitlines():
        if not line.startswith("apiserver_flowcontrol_dispatched_requests_total{"):
            continue
        m = re.search(r'flow_schema="([^"]+)"', line)
        if m and m.group(1).startswith(f"{tag}-"):
            out[m.group(1).rsplit("-", 1)[1]] += float(line.rsplit(" ", 1)[1])
    return out


def start_operator(kubeconfig: str, ns: str, log_path: Path) -> subprocess.Popen[bytes]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(OPERATOR_BIN), "--namespace", ns,
                             "--liveness", f"http://127.0.0.1:{port}/healthz"],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, KUBECONFIG=kubeconfig),
                            start_new_session=True)
    time.sleep(1)
    if proc.poll() is not None:
        raise RuntimeError(f"operator exited: {log_path.read_text()}")
    return proc


def manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
            "metadata": {"name": name},
            "spec": {"model": {"id": "cross-encoder/ms-marco-MiniLM-L-6-v2"},
                     "parallelism": {"maxParallel": 2},
                     "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}}


def create_all(kubeconfig: str, ns: str, names: list[str]) -> float:
    """Create the resources from 8 threads (kubectl's client-side rate limit would make the
    creation, not the operator, the bottleneck); return the seconds it took."""
    import kubernetes

    api = kubernetes.client.CustomObjectsApi(
        kubernetes.config.new_client_from_config(config_file=kubeconfig))
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: api.create_namespaced_custom_object(
            "reranker.dev", "v1alpha1", ns, "rerankerdeployments", manifest(n)), names))
    return time.monotonic() - t0


def converged(cluster: Cluster, ns: str, prefix: str, count: int) -> bool:
    items = [o for o in cluster.json("rrd", "-n", ns)["items"]
             if o["metadata"]["name"].startswith(prefix + "-")]
    done = [o for o in items
            if (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
            and any(c["type"] == "Ready" for c in o["status"].get("conditions", ()))]
    if len(done) < count:
        return False
    kids = cluster.json("configmaps,deployments,services,horizontalpodautoscalers,"
                        "poddisruptionbudgets", "-n", ns, "-l", MANAGED)["items"]
    owned = [k for k in kids if k["metadata"]["labels"].get(
        "app.kubernetes.io/instance", "").startswith(prefix + "-")]
    return len(owned) >= count * CHILDREN_PER_RESOURCE


def converge(cluster: Cluster, ns: str, prefix: str, count: int, timeout: float
             ) -> tuple[float, float]:
    """(seconds the creation took, seconds from the first create to convergence)."""
    t0 = time.monotonic()
    created = create_all(cluster.kubeconfig, ns, [f"{prefix}-{i:03d}" for i in range(count)])
    while not converged(cluster, ns, prefix, count):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{prefix}: not converged after {timeout}s")
        time.sleep(0.25)
    return created, time.monotonic() - t0


def stop_operator(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    cluster = Cluster()
    tag = f"bench-op-{secrets.token_hex(3)}"
    ns = tag
    proc: subprocess.Popen[bytes] | None = None
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{tag}.log"
    try:
        cluster.kubectl("apply", "-f", str(REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"))
        cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                        "crd/rerankerdeployments.reranker.dev")
        cluster.kubectl("create", "namespace", ns)
        rbac_and_flowschemas(cluster, ns, tag)
        kubeconfig = cluster.mint_kubeconfig(ns, SA)
        proc = start_operator(kubeconfig, ns, log_path)
        time.sleep(2)  # the watch streams are up

        _, single = converge(cluster, ns, "one", 1, args.timeout)
        log(f"baseline: 1 RerankerDeployment converged in {single:.2f}s")

        n = args.count
        before = requests_by(cluster, tag)
        created, fleet = converge(cluster, ns, "fleet", n, args.timeout)
        during = requests_by(cluster, tag)
        log(f"{n} converged in {fleet:.1f}s")
        writes_converging = during["writes"] - before["writes"]

        time.sleep(5)  # let the controller-manager's follow-up status changes pass through
        idle_start = requests_by(cluster, tag)
        time.sleep(args.idle_seconds)
        idle_end = requests_by(cluster, tag)
        minutes = args.idle_seconds / 60
        idle_writes = (idle_end["writes"] - idle_start["writes"]) / minutes
        idle_reads = (idle_end["reads"] - idle_start["reads"]) / minutes

        # Restart with everything in place: it must re-check all and write nothing.
        stop_operator(proc)
        restart_before = requests_by(cluster, tag)
        t0 = time.monotonic()
        proc = start_operator(kubeconfig, ns, log_path.with_suffix(".restart.log"))
        restart_log = log_path.with_suffix(".restart.log")
        while restart_log.read_text().count("Resuming is processed") < n + 1:
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError("the restarted operator did not resume everything")
            time.sleep(0.25)
        resumed = time.monotonic() - t0
        time.sleep(5)
        restart_writes = requests_by(cluster, tag)["writes"] - restart_before["writes"]

        print(f"reranker-operator convergence ({n} RerankerDeployments, "
              f"{CHILDREN_PER_RESOURCE} children each; operator as ServiceAccount; "
              f"{os.cpu_count()} CPUs)")
        print(f"  baseline, 1 resource:     converged in {single:6.2f} s")
        print(f"  fleet, {n} resources:    converged in {fleet:6.2f} s from the first create "
              f"(creating them took {created:.2f} s)")
        print(f"  per resource:             {1000 * fleet / n:6.1f} ms = "
              f"{fleet / n / single:.3f} x the single-resource time")
        print(f"  API writes converging:    {writes_converging:.0f} "
              f"({writes_converging / n:.1f} per resource: {CHILDREN_PER_RESOURCE} children, "
              f"status, Kopf's annotation, Events)")
        print(f"  idle for {args.idle_seconds:.0f} s:            {idle_writes:.1f} API writes/min "
              f"(target 0), {idle_reads:.1f} other requests/min")
        print(f"  restart:                  all {n + 1} resumed in {resumed:.2f} s, "
              f"{restart_writes:.0f} API writes")
    finally:
        if proc is not None:
            stop_operator(proc)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found",
                        check=False)
        cluster.kubectl("delete", "flowschema", f"{tag}-writes", f"{tag}-reads",
                        "--ignore-not-found", check=False)
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", tag, "--ignore-not-found",
                        check=False)
        log(f"operator logs: {log_path}, {log_path.with_suffix('.restart.log')}")
        cluster.down()


if __name__ == "__main__":
    main()
