"""The dev cluster's metrics path: Prometheus scraping the fleet and prometheus-adapter serving
`custom.metrics.k8s.io`, so that a RerankerDeployment's HPA scales on `reranker_queue_depth`
exactly as it does on a cluster with kube-prometheus-stack and the prometheus-adapter chart.

Both run as host processes next to the control plane (like etcd and the API server), with
state under <cluster dir>/metrics/:

- Prometheus discovers the server pods through the API server (`kubernetes_sd_configs`, role
  endpointslice) with the scrape job users get in deploy/prometheus/prometheus-scrape-config.yaml,
  authenticated as the ServiceAccount monitoring/prometheus (a token from the TokenRequest API,
  the cluster CA). Debian's prometheus package is built without Kubernetes service discovery
  ("field kubernetes_sd_configs not found"), so this one is built from its pinned Go module
  (hack/prometheus/go.mod) with only that discovery mechanism compiled in, and cached.
- prometheus-adapter, built from its pinned Go module (hack/prometheus-adapter/go.mod) and
  cached like the control plane, serves the project's own rules
  (deploy/prometheus/prometheus-adapter-values.yaml, `rules.custom`) as the ServiceAccount
  monitoring/prometheus-adapter (auth-delegator, extension-apiserver-authentication-reader:
  the RBAC of the adapter's chart). It listens on the node's IP; a selector-less Service
  monitoring/prometheus-adapter with an Endpoints object pointing there is what the APIService
  v1beta1.custom.metrics.k8s.io names, and the API server's aggregation layer (front-proxy
  client certificate, `--enable-aggregator-routing`) forwards `/apis/custom.metrics.k8s.io/...`
  to it. The adapter's serving certificate is issued by the cluster CA, which is the
  APIService's caBundle.

Periods are short for tests (scrape every second, relist series every 5 s); the adapter rules'
own 1 m averaging stays as shipped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import build, certs, paths, processes
from .console import die, log
from .paths import HACK, REPO

ADAPTER_MOD = HACK / "prometheus-adapter"
ADAPTER_MODULE = "sigs.k8s.io/prometheus-adapter"
PROMETHEUS_MOD = HACK / "prometheus"
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
#: Prometheus' build tags: no service discovery but Kubernetes' (no cloud SDKs to compile).
PROMETHEUS_TAGS = "remove_all_sd,enable_kubernetes_sd"
SCRAPE_JOB = REPO / "deploy" / "prometheus" / "prometheus-scrape-config.yaml"
ADAPTER_VALUES = REPO / "deploy" / "prometheus" / "prometheus-adapter-values.yaml"
NAMESPACE = "monitoring"
ADAPTER_SERVICE = "prometheus-adapter"
APISERVICE = "v1beta1.custom.metrics.k8s.io"
PROCS = ("prometheus", "prometheus-adapter")
SCRAPE_INTERVAL = "1s"
RELIST_INTERVAL = "5s"
TOKEN_DURATION = "720h"


# --------------------------------------------------------------------------- build


def adapter_version() -> str:
    return build.required_version(ADAPTER_MOD / "go.mod", ADAPTER_MODULE)


def prometheus_version() -> str:
    return build.required_version(PROMETHEUS_MOD / "go.mod", PROMETHEUS_MODULE)


def binaries() -> dict[str, Path]:
    """The cached Prometheus and prometheus-adapter, built from the pinned modules on first
    use (like the control plane: once per version, under the shared lock)."""
    prom = paths.cache_root() / "prometheus" / prometheus_version() / "bin" / "prometheus"
    adapter = paths.cache_root() / "prometheus-adapter" / adapter_version() / "bin" / "prometheus-adapter"
    build.build_extra([
        build.Target("prometheus", prom, f"{PROMETHEUS_MODULE}/cmd/prometheus", PROMETHEUS_MOD,
                     tags=PROMETHEUS_TAGS),
        build.Target("prometheus-adapter", adapter, f"{ADAPTER_MODULE}/cmd/adapter",
                     ADAPTER_MOD)])
    return {"prometheus": prom, "prometheus-adapter": adapter}


# --------------------------------------------------------------------------- objects


def _read_yaml(path: Path) -> Any:
    try:
        import yaml  # the only non-stdlib import of hack/: the rules are YAML
    except ImportError:
        die(f"hack/cluster metrics needs PyYAML to read {path}: run it with the project's "
            "venv (.venv/bin/python hack/cluster metrics up)")
    return yaml.safe_load(path.read_text())


def prometheus_config(server: str, ca: Path, token: Path) -> dict[str, Any]:
    """prometheus.yml: the shipped scrape job, pointed at this API server, scraping fast."""
    job = _read_yaml(SCRAPE_JOB)
    job["scrape_interval"] = job["scrape_timeout"] = SCRAPE_INTERVAL
    job["kubernetes_sd_configs"] = [{
        "role": "endpointslice", "api_server": server,
        "tls_config": {"ca_file": str(ca)},
        "authorization": {"credentials_file": str(token)}}]
    return {"global": {"scrape_interval": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [job]}


def adapter_config() -> dict[str, Any]:
    """The adapter's config file: the shipped values' custom rules (as the chart renders it)."""
    return {"rules": _read_yaml(ADAPTER_VALUES)["rules"]["custom"]}


def objects(node_ip: str, adapter_port: int, ca_bundle: bytes) -> dict[str, Any]:
    """The RBAC, Service, Endpoints and APIService of the metrics path, as one List."""
    def role_binding(kind: str, name: str, role_kind: str, role: str, sa: str,
                     namespace: str | None = None) -> dict:
        meta: dict = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                            "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]}

    def reader(name: str, rules: list) -> dict:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": name}, "rules": rules}

    read = ["get", "list", "watch"]
    items = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "prometheus", "namespace": NAMESPACE}},
        reader("dev-prometheus", [
            {"apiGroups": [""], "resources": ["services", "endpoints", "pods"], "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}]),
        role_binding("ClusterRoleBinding", "dev-prometheus", "ClusterRole", "dev-prometheus",
                     "prometheus"),
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE}},
        reader("dev-prometheus-adapter", [
            {"apiGroups": [""], "resources": ["namespaces", "pods", "services", "nodes"],
             "verbs": read}]),
        role_binding("ClusterRoleBinding", "dev-prometheus-adapter", "ClusterRole",
                     "dev-prometheus-adapter", ADAPTER_SERVICE),
        role_binding("ClusterRoleBinding", "dev-prometheus-adapter:auth-delegator",
                     "ClusterRole", "system:auth-delegator", ADAPTER_SERVICE),
        role_binding("RoleBinding", "dev-prometheus-adapter:auth-reader", "Role",
                     "extension-apiserver-authentication-reader", ADAPTER_SERVICE,
                     namespace="kube-system"),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": adapter_port,
                             "protocol": "TCP"}]}},
        # A selector-less Service's endpoints are ours to write; the mirroring controller
        # copies them into an EndpointSlice.
        {"apiVersion": "v1", "kind": "Endpoints",
         "metadata": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE},
         "subsets": [{"addresses": [{"ip": node_ip}],
                      "ports": [{"name": "https", "port": adapter_port, "protocol": "TCP"}]}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": APISERVICE},
         "spec": {"group": "custom.metrics.k8s.io", "version": "v1beta1",
                  "service": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE, "port": 443},
                  "caBundle": base64.b64encode(ca_bundle).decode(),
                  "groupPriorityMinimum": 100, "versionPriority": 100}},
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


# --------------------------------------------------------------------------- run


def _kubectl(info: dict[str, Any], *args: str, input: str | None = None) -> str:
    r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], *args],
                       input=input, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        die(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _prometheus_ready(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return r.status == 200, ""
    except OSError as e:
        return False, str(e)


def _apiservice_available(info: dict[str, Any]) -> tuple[bool, str]:
    r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], "get",
                        "apiservice", APISERVICE, "-o", "json"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, r.stderr
    conds = json.loads(r.stdout).get("status", {}).get("conditions") or []
    cond: dict[str, Any] = next((c for c in conds if c["type"] == "Available"), {})
    return cond.get("status") == "True", str(cond.get("message", ""))


def read_info(d: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((d / "metrics" / "metrics.json").read_text()))
    return {}


def up(d: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Start Prometheus and the adapter for the cluster in D and register the APIService;
    return what is recorded in <d>/metrics/metrics.json. Idempotent."""
    node = info.get("node") or {}
    if not node.get("ready"):
        die("the metrics path needs the node (the adapter listens on the node's address): "
            f"{node.get('reason') or 'the cluster runs without one'}")
    node_ip = str(node["ip"])
    current = read_info(d)
    if current and set(processes.running(d)) >= set(PROCS):
        log(f"metrics already up: Prometheus {current['prometheus']}")
        return current
    down(d, quiet=True)
    bins = binaries()
    t0 = time.monotonic()
    m, pki = d / "metrics", d / "pki"
    m.mkdir(parents=True, exist_ok=True)
    adapter_port, prom_port = _free_port(node_ip), _free_port("127.0.0.1")
    prometheus_url = f"http://127.0.0.1:{prom_port}"
    certs.issue_serving(pki, "prometheus-adapter",
                        f"DNS:{ADAPTER_SERVICE}.{NAMESPACE}.svc,IP:{node_ip}")
    _kubectl(info, "apply", "-f", "-", input=json.dumps(
        objects(node_ip, adapter_port, (pki / "ca.crt").read_bytes())))
    tokens = {sa: _kubectl(info, "create", "token", sa, "-n", NAMESPACE,
                           f"--duration={TOKEN_DURATION}").strip()
              for sa in ("prometheus", ADAPTER_SERVICE)}
    token_file = m / "prometheus.token"
    certs.write_private(token_file, tokens["prometheus"])
    adapter_kubeconfig = m / "adapter.kubeconfig"
    certs.write_private(adapter_kubeconfig, certs.kubeconfig_text(
        info["server"], pki / "ca.crt", f"system:serviceaccount:{NAMESPACE}:{ADAPTER_SERVICE}",
        {"token": tokens[ADAPTER_SERVICE]}))
    # JSON is YAML: both programs read these.
    (m / "prometheus.yml").write_text(json.dumps(
        prometheus_config(info["server"], pki / "ca.crt", token_file), indent=2) + "\n")
    (m / "adapter-rules.yaml").write_text(json.dumps(adapter_config(), indent=2) + "\n")

    procs = {
        "prometheus": processes.start(d, "prometheus", bins["prometheus"], [
            f"--config.file={m / 'prometheus.yml'}",
            f"--storage.tsdb.path={m / 'prometheus-data'}",
            "--storage.tsdb.retention.time=6h",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn"]),
        "prometheus-adapter": processes.start(d, "prometheus-adapter", bins["prometheus-adapter"], [
            f"--secure-port={adapter_port}", f"--bind-address={node_ip}",
            f"--tls-cert-file={pki / 'prometheus-adapter.crt'}",
            f"--tls-private-key-file={pki / 'prometheus-adapter.key'}",
            f"--lister-kubeconfig={adapter_kubeconfig}",
            f"--authentication-kubeconfig={adapter_kubeconfig}",
            f"--authorization-kubeconfig={adapter_kubeconfig}",
            f"--prometheus-url={prometheus_url}/",
            f"--metrics-relist-interval={RELIST_INTERVAL}",
            f"--config={m / 'adapter-rules.yaml'}",
            "--v=1"]),
    }
    try:
        processes.wait_for("Prometheus /-/ready", lambda: _prometheus_ready(prometheus_url),
                           procs, d, 60)
        processes.wait_for(f"APIService {APISERVICE} Available",
                           lambda: _apiservice_available(info), procs, d, 90)
    except processes.StartFailed as e:
        down(d, quiet=True)
        die(str(e))
    state = {"prometheus": prometheus_url, "adapter": f"https://{node_ip}:{adapter_port}",
             "apiservice": APISERVICE, "prometheus_version": prometheus_version(),
             "adapter_version": adapter_version(), "started_at": time.time()}
    (m / "metrics.json").write_text(json.dumps(state, indent=2) + "\n")
    log(f"metrics up in {time.monotonic() - t0:.1f}s: Prometheus {prometheus_url}, "
        f"prometheus-adapter {state['adapter']} serving {APISERVICE}")
    return state


def down(d: Path, *, quiet: bool = False) -> None:
    """Stop both and drop their state. The objects stay with the cluster (`up` re-applies
    them); while the adapter is down the APIService reports itself unavailable."""
    processes.stop(d, PROCS, quiet=quiet)
    shutil.rmtree(d / "metrics", ignore_errors=True)
