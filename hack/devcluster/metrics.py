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
import subprocess
import time
import urllib.request
from pathlib import Path

from . import build, certs, process
from .paths import HACK, REPO, cache_root, log

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
    prom = cache_root() / "prometheus" / prometheus_version() / "bin" / "prometheus"
    adapter = cache_root() / "prometheus-adapter" / adapter_version() / "bin" / "prometheus-adapter"
    build.build_extra([
        build.Target("prometheus", prom, f"{PROMETHEUS_MODULE}/cmd/prometheus", PROMETHEUS_MOD,
                     tags=PROMETHEUS_TAGS),
        build.Target("prometheus-adapter", adapter, f"{ADAPTER_MODULE}/cmd/adapter",
                     ADAPTER_MOD)])
    return {"prometheus": prom, "prometheus-adapter": adapter}


# --------------------------------------------------------------------------- objects


def _read_yaml(path: Path):
    try:
        import yaml  # the only non-stdlib import of hack/: the rules are YAML
    except ImportError:
        raise SystemExit(f"hack/cluster metrics needs PyYAML to read {path}: run it with the "
                         "project's venv (.venv/bin/python hack/cluster metrics up)") from None
    return yaml.safe_load(path.read_text())


def prometheus_config(server: str, ca: Path, token: Path) -> dict:
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


def adapter_config() -> dict:
    """The adapter's config file: the shipped values' custom rules (as the chart renders it)."""
    return {"rules": _read_yaml(ADAPTER_VALUES)["rules"]["custom"]}


def objects(node_ip: str, adapter_port: int, ca_bundle: bytes) -> dict:
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


def _kubectl(info: dict, *args: str, input: str | None = None) -> str:
    r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], *args],
                       input=input, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _wait(desc: str, check, procs: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(f"{name} exited with code {p.returncode} while waiting for "
                                 f"{desc}; see its log")
        ok, detail = check()
        if ok:
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {desc}: {detail[:300]}")


def _prometheus_ready(url: str):
    def check():
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                return r.status == 200, ""
        except OSError as e:
            return False, str(e)
    return check


def up(d: Path, info: dict) -> dict:
    """Start Prometheus and the adapter for the cluster in D and register the APIService;
    return what was recorded in <d>/metrics/metrics.json. Idempotent."""
    node_ip = info.get("node_ip")
    if not node_ip:
        raise SystemExit("the metrics path needs the node (the adapter listens on the node's "
                         f"IP): {info.get('node_reason') or 'hack/cluster up ran without it'}")
    m = d / "metrics"
    current = read_info(d)
    if current and set(process.running(d, PROCS)) == set(PROCS):
        log(f"metrics already up: Prometheus {current['prometheus']}")
        return current
    down(d, quiet=True)
    m.mkdir(parents=True, exist_ok=True)
    bins = binaries()
    pki = Path(info["pki"]) if info.get("pki") else d / "pki"
    t0 = time.monotonic()

    adapter_port = process.free_port(node_ip)
    prom_port = process.free_port("127.0.0.1")
    prometheus_url = f"http://127.0.0.1:{prom_port}"
    certs.issue(pki, "prometheus-adapter", "/CN=prometheus-adapter",
                "extendedKeyUsage=serverAuth",
                f"subjectAltName=DNS:{ADAPTER_SERVICE}.{NAMESPACE}.svc,IP:{node_ip}")
    _kubectl(info, "apply", "-f", "-", input=json.dumps(
        objects(node_ip, adapter_port, (pki / "ca.crt").read_bytes())))
    tokens = {}
    for sa in ("prometheus", ADAPTER_SERVICE):
        tokens[sa] = _kubectl(info, "create", "token", sa, "-n", NAMESPACE,
                              f"--duration={TOKEN_DURATION}").strip()
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
        "prometheus": process.start(d, "prometheus", bins["prometheus"], [
            f"--config.file={m / 'prometheus.yml'}",
            f"--storage.tsdb.path={m / 'prometheus-data'}",
            "--storage.tsdb.retention.time=6h",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn"]),
        "prometheus-adapter": process.start(d, "prometheus-adapter", bins["prometheus-adapter"], [
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
        _wait("Prometheus /-/ready", _prometheus_ready(prometheus_url), procs, 60)

        def available():
            r = subprocess.run([info["kubectl"], "--kubeconfig", info["kubeconfig"], "get",
                                "apiservice", APISERVICE, "-o", "json"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                return False, r.stderr
            conds = json.loads(r.stdout).get("status", {}).get("conditions") or []
            cond = next((c for c in conds if c["type"] == "Available"), {})
            return cond.get("status") == "True", cond.get("message", "")
        _wait(f"APIService {APISERVICE} Available", available, procs, 90)
    except SystemExit:
        stop_on_error(d)
        raise
    state = {"prometheus": prometheus_url, "adapter": f"https://{node_ip}:{adapter_port}",
             "apiservice": APISERVICE, "prometheus_version": prometheus_version(),
             "adapter_version": adapter_version(),
             "started_at": time.time()}
    (m / "metrics.json").write_text(json.dumps(state, indent=2) + "\n")
    log(f"metrics up in {time.monotonic() - t0:.1f}s: Prometheus {prometheus_url}, "
        f"adapter {state['adapter']} serving {APISERVICE}")
    return state


def stop_on_error(d: Path) -> None:
    for name in PROCS:
        lf = d / "logs" / f"{name}.log"
        if lf.exists():
            log(f"--- last lines of {lf} ---")
            for line in lf.read_text(errors="replace").splitlines()[-20:]:
                log(f"    {line}")
    down(d, quiet=True)


def read_info(d: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((d / "metrics" / "metrics.json").read_text())
    return {}


def down(d: Path, quiet: bool = False) -> None:
    """Stop both processes and drop their state (the cluster's objects go with the cluster;
    a stopped adapter leaves the APIService unavailable, which `up` replaces)."""
    process.stop(d, PROCS, quiet=quiet)
    with contextlib.suppress(FileNotFoundError):
        (d / "metrics" / "metrics.json").unlink()
    import shutil
    shutil.rmtree(d / "metrics", ignore_errors=True)
