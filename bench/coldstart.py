"""Cold start on the real node: a RerankerDeployment scaled 1 -> N, each pod's timeline measured.

    flock /tmp/cluster.lock .venv/bin/python bench/coldstart.py --label after --record after.json
    .venv/bin/python bench/coldstart.py --from-record docs/coldstart-run.json --plot docs/coldstart.png

How long a new server pod takes to serve decides how far autoscaling lags behind a burst and
what every wake from zero costs (docs/autoscaling.md). This brings the fleet up as a user does
(tests/e2e/test_fleet.py's way: the images `make images` built, the chart installing the
operator as a pod, a RerankerDeployment of the embedded MiniLM with 1 replica), waits for it to
be Ready, then scales it to N replicas and waits again; `--rounds 2` scales back to 1 and up
again, so that more later pods are measured on the same warm node. Per pod it records:

- scheduled: the PodScheduled condition's time,
- container started: containerStatuses[].state.running.startedAt,
- model ready: the server's own GET /health `startup.ready_at`, with `startup.seconds`' parts
  (imports, model files, convert, compile, precision, warm-up); a server without `startup`
  (an older image) gives the time of its "serving ... after X s" log line instead, and its
  first log line as the end of the imports,
- Ready: the Ready condition's time.

Kubernetes writes condition times and startedAt in whole seconds (RFC 3339, no fraction), so
the figures between them (the headline container started -> Ready) are +-1 s; the server's
own times (/health, log lines timestamped by the container runtime) are sub-second, and the
parts come from them. The pods and this script share the machine's clock.

The headline figures (issue 23's targets): the first pod's container started -> Ready (<= 60 s)
and the p50 over the later pods (<= 10 s). The record (--record) is what bench/coldstart_plot.py
draws; --plot draws it at once.

The cluster: the one running in RERANKER_CLUSTER_DIR (default .cluster) when it has a Ready
node, else `hack/cluster up` there and `hack/cluster down` at the end. The node is one per
machine: run this under the machine's cluster lock where one is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "e2e"), str(REPO / "tests" / "ship")]
from fleet import condition, is_ready, pods  # noqa: E402
from kubecluster import KubeCluster  # noqa: E402

IMAGES = {"operator": "reranker-fleet/operator:dev", "server": "reranker-fleet/server:dev",
          "redis": "reranker-fleet/redis:dev"}
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
FLEET = "coldstart"
SERVER = f"app.kubernetes.io/instance={FLEET},app.kubernetes.io/component=server"
PORT = 8000
#: The server's start phases, in the order they run (GET /health `startup.seconds`).
PARTS = ("imports", "model_files", "convert", "compile", "precision", "warm_up")
#: issue 23's targets, seconds from container started to Ready.
TARGET_FIRST, TARGET_LATER = 60.0, 10.0


def unix(stamp: str | None) -> float | None:
    """RFC 3339 (Kubernetes' whole seconds, or the runtime's nanoseconds) -> unix seconds."""
    if not stamp:
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {stamp!r}")
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + float(m.group(2) or 0)


def now() -> float:
    """The host's time in whole seconds, as Kubernetes writes its times (truncated): a pod
    scheduled in the same second as the request shows 0, not -0.4."""
    return float(int(time.time()))


# --- the cluster and the fleet ------------------------------------------------------------------

def hack_cluster(state_dir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "hack" / "cluster"), *args], text=True,
                          env=dict(os.environ, RERANKER_CLUSTER_DIR=str(state_dir)), **kw)


@contextlib.contextmanager
def node_cluster(state_dir: Path) -> Iterator[KubeCluster]:
    """The running cluster with a node, or one brought up here (and down at the end)."""
    info_file = state_dir / "cluster.json"
    running = hack_cluster(state_dir, "status", capture_output=True).returncode == 0
    owned = not running
    if owned:
        t0 = time.monotonic()
        r = hack_cluster(state_dir, "up", stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            raise SystemExit(f"hack/cluster up exited {r.returncode}")
        print(f"# hack/cluster up: {time.monotonic() - t0:.0f} s", flush=True)
    info = json.loads(info_file.read_text())
    try:
        if not info.get("node", {}).get("ready"):
            raise SystemExit(f"no node: {info.get('node', {}).get('reason')}")
        yield KubeCluster(state_dir, info)
    finally:
        if owned:
            hack_cluster(state_dir, "down", capture_output=True)


def wait_images(cluster: KubeCluster, timeout: float = 90) -> None:
    """The kubelet lists the node's images in its status some seconds after it starts."""
    def present() -> bool:
        node = cluster.get_json("node", cluster.info["node"]["name"])
        names = {n for image in node["status"].get("images") or [] for n in image.get("names") or []}
        return all(f"docker.io/{i}" in names for i in IMAGES.values())

    cluster.eventually(present, timeout=timeout, interval=2,
                       desc=f"images {sorted(IMAGES.values())} on the node (`make images`)")


@contextlib.contextmanager
def chart(cluster: KubeCluster) -> Iterator[str]:
    """The chart installed with the `make images` operator image (as tests/e2e/test_fleet.py
    does); its operator pod Ready. Yields the operator's namespace."""
    import helm_python as helm
    from helm_render import CHART, adopt_crds

    namespace, release = f"coldstart-op-{secrets.token_hex(3)}", "cold"
    cluster.kubectl("create", "namespace", namespace)
    config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    repo, tag = IMAGES["operator"].split(":")
    values = {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
              "serverImage": IMAGES["server"], "redisImage": IMAGES["redis"],
              "clusterCIDRs": ["198.18.64.0/24", "198.19.0.0/24"]}
    adopt_crds(cluster, release, namespace)
    config.install(str(CHART), release, values, namespace=namespace, timeout=120)
    try:
        wait_pods(cluster, namespace, "app.kubernetes.io/name=reranker-operator", 1, timeout=180)
        yield namespace
    finally:
        config.uninstall(release, ignore_not_found=True, timeout=60)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def wait_pods(cluster: KubeCluster, namespace: str, selector: str, count: int,
              timeout: float = 600) -> list[dict[str, Any]]:
    """Exactly `count` live pods, all Ready, none other still terminating (a terminating pod
    would share the CPUs with the next round's starts)."""
    def ready() -> list[dict[str, Any]]:  # empty (falsy) until they are
        found = pods(cluster, namespace, selector)
        return found if len(found) == count and all(map(is_ready, found)) else []

    return cluster.eventually(ready, timeout=timeout, interval=0.5,
                              desc=f"{count} Ready pods {selector} in {namespace}")


def rd_manifest(replicas: int) -> str:
    return json.dumps({
        "apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
        "metadata": {"name": FLEET},
        "spec": {"model": {"id": MODEL}, "replicas": replicas,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                               "limits": {"memory": "2Gi"}}}})


# --- one pod's timeline -------------------------------------------------------------------------

def server_view(cluster: KubeCluster, namespace: str, pod: str) -> dict[str, Any]:
    """What the server says about its own start: /health `startup`, else its log lines."""
    raw = cluster.kubectl("get", "--raw",
                          f"/api/v1/namespaces/{namespace}/pods/{pod}:{PORT}/proxy/health").stdout
    health = json.loads(raw)
    model = health.get("model") or {}
    view: dict[str, Any] = {"backend": model.get("backend"), "dtype": model.get("dtype"),
                            "precision_record": model.get("precision_record")}
    startup = health.get("startup")
    if startup and startup.get("ready_at"):
        view.update(source="health", started_at=startup.get("started_at"),
                    ready_at=startup["ready_at"], seconds=startup.get("seconds") or {})
        return view
    # An older server: the container runtime's timestamps (nanoseconds) of its log lines.
    log = cluster.kubectl("logs", "-n", namespace, pod, "--timestamps").stdout.splitlines()
    first = unix(log[0].split(" ", 1)[0]) if log else None
    for line in log:
        stamp, _, text = line.partition(" ")
        m = re.search(r"serving .* after ([0-9.]+)s", text)
        if m:
            view.update(source="log", first_log_at=first, ready_at=unix(stamp),
                        load_seconds=float(m.group(1)), first_log=log[0].partition(" ")[2][:200],
                        ready_log=text[:300])
            return view
    view.update(source="none")
    return view


def pod_record(cluster: KubeCluster, namespace: str, pod: dict[str, Any], *, trigger: float,
               role: str, round_: int) -> dict[str, Any]:
    name = pod["metadata"]["name"]
    (status,) = [c for c in pod["status"]["containerStatuses"] if c["name"] != "istio-proxy"][:1]
    rec: dict[str, Any] = {
        "pod": name, "role": role, "round": round_, "trigger": trigger,
        "created": unix(pod["metadata"]["creationTimestamp"]),
        "scheduled": unix(condition(pod, "PodScheduled").get("lastTransitionTime")),
        "container_started": unix(status["state"]["running"]["startedAt"]),
        "ready": unix(condition(pod, "Ready").get("lastTransitionTime")),
        "image": status.get("image"),
        "server": server_view(cluster, namespace, name),
    }
    rec["started_to_ready"] = rec["ready"] - rec["container_started"]
    return rec


# --- the run ------------------------------------------------------------------------------------

def run(cluster: KubeCluster, *, replicas: int, rounds: int) -> dict[str, Any]:
    wait_images(cluster)
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    with chart(cluster):
        namespace = f"coldstart-{secrets.token_hex(3)}"
        cluster.kubectl("create", "namespace", namespace)
        try:
            trigger = now()
            cluster.apply(rd_manifest(1), namespace)
            (first,) = wait_pods(cluster, namespace, SERVER, 1)
            records.append(pod_record(cluster, namespace, first, trigger=trigger, role="first", round_=0))
            print(f"# first pod Ready, {records[-1]['started_to_ready']:.0f} s after its container started",
                  flush=True)
            for round_ in range(1, rounds + 1):
                # back to one pod, the others gone, before each scale-up
                cluster.kubectl("scale", "rrd", FLEET, "-n", namespace, "--replicas=1")
                (kept,) = wait_pods(cluster, namespace, SERVER, 1)
                trigger = now()
                cluster.kubectl("scale", "rrd", FLEET, "-n", namespace, f"--replicas={replicas}")
                for pod in wait_pods(cluster, namespace, SERVER, replicas):
                    if pod["metadata"]["name"] != kept["metadata"]["name"]:
                        records.append(pod_record(cluster, namespace, pod, trigger=trigger,
                                                  role="later", round_=round_))
                print(f"# round {round_}: {replicas} pods Ready", flush=True)
        finally:
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    later = [r["started_to_ready"] for r in records if r["role"] == "later"]
    return {"replicas": replicas, "rounds": rounds, "image": records[0]["image"],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "pods": records,
            "first_started_to_ready": records[0]["started_to_ready"],
            "later_started_to_ready_p50": statistics.median(later) if later else None,
            "later_count": len(later)}


def parts(rec: dict[str, Any]) -> dict[str, float]:
    """The server's phases (seconds), from /health; an older server gives container started ->
    its first log line (the app's imports; torch's come later) and the model's load only."""
    server = rec["server"]
    if server.get("source") == "health":
        return {k: float(server["seconds"].get(k) or 0.0) for k in PARTS}
    if server.get("source") == "log":
        return {"to first log line": server["first_log_at"] - rec["container_started"],
                "model load": server["load_seconds"]}
    return {}


def table(record: dict[str, Any]) -> str:
    cols = ("pod", "role", "sched", "started", "model ready", "Ready", "started->Ready", "parts (s)")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for rec in record["pods"]:
        t0 = rec["trigger"]
        model_ready = rec["server"].get("ready_at")
        lines.append(" | ".join((
            rec["pod"].rsplit("-", 1)[-1] + (f" (round {rec['round']})" if rec["role"] == "later" else ""),
            rec["role"],
            f"{rec['scheduled'] - t0:.0f}", f"{rec['container_started'] - t0:.0f}",
            f"{model_ready - t0:.1f}" if model_ready else "?", f"{rec['ready'] - t0:.0f}",
            f"{rec['started_to_ready']:.0f}",
            ", ".join(f"{k} {v:.1f}" for k, v in parts(rec).items()))))
    return "\n".join(lines)


def summary(record: dict[str, Any]) -> str:
    first, p50, n = (record["first_started_to_ready"], record["later_started_to_ready_p50"],
                     record["later_count"])
    return (f"first pod: container started -> Ready {first:.0f} s (target <= {TARGET_FIRST:.0f} s: "
            f"{'MET' if first <= TARGET_FIRST else 'MISSED'})\n"
            f"later pods: p50 of {n} container started -> Ready {p50:.0f} s (target <= {TARGET_LATER:.0f} s: "
            f"{'MET' if p50 <= TARGET_LATER else 'MISSED'})\n"
            "(Kubernetes' condition and startedAt times are whole seconds: +-1 s; the parts are the "
            "server's own sub-second times)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4, help="scale 1 -> this (default 4)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="scale-ups from 1 on the same fleet (default 2: 6 later pods with --replicas 4)")
    parser.add_argument("--record", type=Path, help="write the run as JSON here")
    parser.add_argument("--plot", type=Path, help="draw the timeline (bench/coldstart_plot.py) here")
    parser.add_argument("--label", default="", help="a name for this run in the record and the plot's title")
    parser.add_argument("--from-record", type=Path,
                        help="print (and with --plot, draw) recorded runs (a run or a list); no cluster")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from coldstart_plot import load, plot

    if args.from_record:
        records = load(args.from_record)
    else:
        state_dir = Path(os.environ.get("RERANKER_CLUSTER_DIR") or REPO / ".cluster").resolve()
        with node_cluster(state_dir) as cluster:
            records = [run(cluster, replicas=args.replicas, rounds=args.rounds)]
        records[0]["label"] = args.label
        if args.record:
            args.record.write_text(json.dumps(records[0], indent=1) + "\n")
            print(f"wrote {args.record}")
    for record in records:
        print(f"## {record.get('label') or 'run'} ({record['image']}, {record['measured_at']})")
        print(table(record))
        print(summary(record))
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
