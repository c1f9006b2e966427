"""The dashboard, the alert rules and the autoscaling rules against a real Prometheus scraping
real servers.

Two `reranker serve` processes (a tiny random-weight BERT, sharing a real redis-server) play
one fleet's two pods; a real Prometheus (the Debian package) scrapes them every second with
the labels a ServiceMonitor would give them (namespace, service, pod, container, job) and
evaluates deploy/prometheus/reranker-rules.yaml. A short, bounded load on loopback makes
every kind of event happen: cache misses, local and Redis hits, 422s, 429 rejections. Then
every PromQL expression of dashboards/*.json, of the alert rules, of the prometheus-adapter
rules and of the KEDA example is evaluated through Prometheus' HTTP API and must return data,
except the few that need kube-state-metrics (listed in NEEDS_KUBE_STATE_METRICS).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateways import GatewayProcess, fleet
from redis_fixture import RedisServer
from reranker.gateway import metrics as gateway_metrics

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "reranker-rules.yaml"
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
NAMESPACE, SERVICE = "search", "minilm"  # the labels of deploy/prometheus/keda-scaledobject.yaml
PODS = ("minilm-0", "minilm-1")
#: The gateway's scrape labels (the chart's gateway Service in the operator's namespace).
GATEWAY_LABELS = {"namespace": "reranker-system", "service": "rel-reranker-operator-gateway",
                  "pod": "gateway-0", "container": "gateway", "endpoint": "http"}

#: Dashboard expressions a lone fleet cannot answer: RerankerDeployment spec and status, which
#: kube-state-metrics exports with deploy/prometheus/kube-state-metrics-rerankerdeployments.yaml.
#: They must evaluate without error here and return nothing.
NEEDS_KUBE_STATE_METRICS = {
    'sum(kube_rerankerdeployment_spec_replicas{namespace=~"$namespace",rerankerdeployment=~"$service"})',
    'sum(kube_rerankerdeployment_status_ready_replicas{namespace=~"$namespace",rerankerdeployment=~"$service"})',
    'sum(kube_rerankerdeployment_status_external_endpoints_total{namespace=~"$namespace",rerankerdeployment=~"$service"})',
    'sum(kube_rerankerdeployment_status_external_endpoints_ready{namespace=~"$namespace",rerankerdeployment=~"$service"})',
}
#: Grafana variables, as a user who selected "All" sees them; the rate window is wide enough to
#: span the whole load.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$namespace": ".*", "$service": ".*"}


def substitute(expr: str) -> str:
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for d in DASHBOARDS for p in dashboard_panels(json.loads(d.read_text()))
            for t in p.get("targets", ()) if t.get("expr")]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def signal(expr: str) -> str:
    """`signal > threshold` -> `signal > bool threshold`: the same series, 0 or 1, whether the
    alert fires or not (each rule is written as one trailing comparison with a number)."""
    out, n = re.subn(r"(==|!=|>=|<=|>|<)\s*([0-9.]+)\s*$", r"\1 bool \2", expr.strip())
    assert n == 1, f"alert expression is not `signal OP number`: {expr}"
    return out


# --- the real thing ---------------------------------------------------------------------------

@dataclass
class Scraped:
    prometheus: str
    servers: list[Any]
    statuses: dict[int, int]

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result = body["data"]["result"]
        return result if isinstance(result, list) else [result]

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.prometheus}{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]


def _wait(url: str, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_load(urls: list[str], *, seconds: float = 8.0, per_second: float = 250.0) -> dict[int, int]:
    """Bounded load on loopback for `seconds`, at most `per_second` requests a second.

    The load spans several scrape intervals on any machine: on a fast one an unpaced load was
    over before Prometheus' second scrape, every sample held the final counts, and every
    rate() was 0 (the error-rate and overload signals then return nothing)."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    sent = [0]
    start = time.monotonic()
    deadline = start + seconds
    shared_docs = [f"shared document number {i} about rerankers" for i in range(10)]

    def record(status: int) -> None:
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    def budget() -> bool:
        while True:
            with lock:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if sent[0] < (now - start) * per_second:
                    sent[0] += 1
                    return True
            time.sleep(0.005)

    with httpx.Client(timeout=30) as client:
        # Misses on pod 0, then Redis hits on pod 1 (same pairs), then local hits on both.
        for url in (urls[0], urls[1], urls[0], urls[1]):
            record(client.post(f"{url}/rerank", json={"query": "what is a reranker?",
                                                      "documents": shared_docs}).status_code)
        # Bad input: 422.
        for url in urls:
            record(client.post(f"{url}/v1/rerank", json={"query": "", "documents": ["x"]}).status_code)

    def worker(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while budget():
                url = urls[(k + i) % len(urls)]
                i += 1
                if i % 3 == 0:  # repeated pairs: cache hits
                    body = {"query": "what is a reranker?", "documents": shared_docs, "top_n": 3}
                    r = client.post(f"{url}/v1/rerank", json={**body, "model": "m"})
                else:  # new pairs: through the model, in batches across requests
                    docs = [f"{uuid.uuid4().hex} document {j}" for j in range(12)]
                    r = client.post(f"{url}/v2/rerank", json={"model": "m", "query": f"q{k}",
                                                              "documents": docs})
                record(r.status_code)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    assert not any(t.is_alive() for t in threads), "load threads did not stop"
    return statuses


def run_gateway_load(url: str, *, seconds: float = 8.0, per_second: float = 40.0) -> None:
    """Load through the gateway beside run_load's, so every series of the dashboard's gateway
    row has data: a request for a fleet with no endpoint (held, a wake, 503 after the hold),
    repeated queries (affinity picks), requests over the fan-out threshold (split), requests
    without a model (the default fleet); the fleet's dead endpoint makes retries."""
    with httpx.Client(timeout=30) as client:
        client.post(f"{url}/v1/rerank", json={"model": "asleep", "query": "q", "documents": ["x"]})
        deadline, i = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            i += 1
            if i % 3 == 0:
                client.post(f"{url}/v1/rerank", json={"model": "m", "query": "what is a reranker?",
                                                      "documents": ["a reranker", "a pear"]})
            elif i % 3 == 1:
                client.post(f"{url}/v2/rerank", json={"model": "m", "query": f"g{i}", "documents": [
                    f"{uuid.uuid4().hex} document {j}" for j in range(12)]})
            else:
                client.post(f"{url}/rerank", json={"query": f"g{i}", "documents": ["x", "y"]})
            time.sleep(1 / per_second)


@pytest.fixture(scope="module")
def scraped(module_server_factory: Any, tiny_bert: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: run `make system-deps` (hack/install-system-deps)"
    folder = tmp_path_factory.mktemp("prometheus")
    redis = RedisServer(_free_port(), folder).start()
    try:
        env = {"RERANKER_MODEL": str(tiny_bert), "REDIS_ENABLED": "true", "REDIS_URL": redis.url,
               # A small queue and a batching window, so that concurrent requests meet a
               # non-empty queue and some are refused (429 queue_full).
               "RERANKER_MAX_QUEUE": "8", "RERANKER_BATCH_SIZE": "8",
               "MICRO_BATCH_WINDOW_MS": "20", "LOG_LEVEL": "WARNING"}
        servers = [module_server_factory(env) for _ in PODS]
        targets = [{"targets": [s.url.removeprefix("http://")],
                    "labels": {"namespace": NAMESPACE, "service": SERVICE, "pod": pod,
                               "container": "reranker", "endpoint": "http"}}
                   for s, pod in zip(servers, PODS)]
        # The gateway in front of them (a static directory), plus an endpoint that refuses
        # connections (retries) and a fleet with none (holds and wakes).
        gateway = GatewayProcess(folder, [
            fleet(SERVICE, ["m"], [s.url for s in servers] + [f"http://127.0.0.1:{_free_port()}"]),
            fleet("asleep", ["asleep"], [], replicas=0, can_wake=True)],
            {"RERANKER_GATEWAY_FANOUT_THRESHOLD": "8", "RERANKER_GATEWAY_FANOUT_MAX_WIDTH": "2",
             "RERANKER_GATEWAY_HOLD_TIMEOUT_SECONDS": "0.5",
             "RERANKER_GATEWAY_DEFAULT_MODEL": "m", "RERANKER_GATEWAY_LOG_LEVEL": "WARNING"})
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            # job = the Service's name, as the Prometheus Operator sets it.
            "scrape_configs": [
                {"job_name": SERVICE, "static_configs": targets},
                {"job_name": GATEWAY_LABELS["service"], "static_configs": [
                    {"targets": [gateway.url.removeprefix("http://")], "labels": GATEWAY_LABELS}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        log = folder / "prometheus.log"
        proc = subprocess.Popen(
            [prometheus, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(f"{url}/-/ready", "prometheus", proc, log)
            handle = Scraped(url, servers, {})
            # Both targets scraped once before the load: rate() needs a sample from before it.
            deadline = time.monotonic() + 30
            while len(handle.query(f'up{{job="{SERVICE}"}} == 1')) < len(PODS):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            through_gateway = threading.Thread(target=run_gateway_load, args=(gateway.url,))
            through_gateway.start()
            handle.statuses = run_load([s.url for s in servers])
            through_gateway.join(60)
            # Scrape what the load left, twice over.
            time.sleep(3)
            yield handle
        finally:
            proc.terminate()
            proc.wait(20)
            gateway.stop()
    finally:
        redis.stop()


# --- tests ----------------------------------------------------------------------------------

def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make system-deps`"
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", "reranker-rules.test.yaml"], cwd=PROM_DIR,
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_load_made_every_kind_of_event(scraped: Scraped) -> None:
    assert scraped.statuses.get(200, 0) > 50, scraped.statuses
    assert scraped.statuses.get(422, 0) >= 2, scraped.statuses
    assert scraped.statuses.get(429, 0) >= 1, scraped.statuses
    assert set(scraped.statuses) <= {200, 422, 429}, scraped.statuses
    assert scraped.query('sum(reranker_cache_hits_total{tier="redis"}) > 0')
    assert scraped.query('sum(reranker_cache_hits_total{tier="local"}) > 0')
    assert scraped.query('reranker_rejected_total{reason="queue_full"} > 0')
    assert len(scraped.query('up{job="minilm"} == 1')) == 2


def test_every_dashboard_expression_returns_data(scraped: Scraped) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 25
    assert NEEDS_KUBE_STATE_METRICS <= set(exprs)
    empty = []
    for expr in exprs:
        result = scraped.query(substitute(expr))  # a PromQL error fails here
        if expr in NEEDS_KUBE_STATE_METRICS:
            assert result == [], f"{expr} answered without kube-state-metrics: {result}"
        elif not result:
            empty.append(expr)
    assert empty == [], "dashboard expressions without data"


def test_kube_state_metrics_config_exports_what_the_dashboard_reads() -> None:
    config = yaml.safe_load((PROM_DIR / "kube-state-metrics-rerankerdeployments.yaml").read_text())
    (resource,) = config["spec"]["resources"]
    assert resource["groupVersionKind"] == {"group": "reranker.dev", "version": "v1alpha1",
                                            "kind": "RerankerDeployment"}
    exported = {f"{resource['metricNamePrefix']}_{m['name']}" for m in resource["metrics"]}
    read = {m for e in NEEDS_KUBE_STATE_METRICS for m in re.findall(r"kube_\w+", e)}
    assert read <= exported
    assert set(resource["labelsFromPath"]) == {"namespace", "rerankerdeployment"}
    # The fields read exist in the CRD's status.
    crd = yaml.safe_load((REPO / "crds" / "rerankerdeployments.reranker.dev.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    for metric in resource["metrics"]:
        schema: dict[str, Any] = {"properties": props}
        for part in metric["each"]["gauge"]["path"]:
            if schema.get("type") == "array":
                schema = schema["items"]
            assert part in schema.get("properties", {}), f"{metric['name']}: no {part} in the CRD"
            schema = schema["properties"][part]


def test_dashboard_variables_have_values(scraped: Scraped) -> None:
    expected = {"namespace": NAMESPACE, "service": SERVICE}
    for path in DASHBOARDS:
        variables = json.loads(path.read_text())["templating"]["list"]
        for var in variables:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, query
            values = scraped.get(f"/api/v1/label/{m.group(2)}/values",
                                 **{"match[]": substitute(m.group(1))})
            assert values == [expected[var["name"]]], (query, values)


def test_prometheus_evaluates_every_alert_rule_without_error(scraped: Scraped) -> None:
    deadline = time.monotonic() + 10
    while True:  # every rule evaluated at least once (Prometheus started before the load)
        rules = [r for g in scraped.get("/api/v1/rules")["groups"] for r in g["rules"]]
        if all(not r["lastEvaluation"].startswith("0001-") for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # Nothing fires within the alerts' `for`. The load refuses requests on purpose, so
    # RerankerOverloaded is pending (the rule works on the real series); a fleet that is up,
    # answers without 5xx and reaches Redis trips none of the others.
    alerts = {a["labels"]["alertname"]: a for a in scraped.get("/api/v1/alerts")["alerts"]}
    assert all(a["state"] == "pending" for a in alerts.values()), alerts
    refused = scraped.statuses.get(429, 0) / sum(scraped.statuses.values())
    if refused > 0.05:
        assert alerts["RerankerOverloaded"]["labels"] == {
            "alertname": "RerankerOverloaded", "namespace": NAMESPACE, "service": SERVICE,
            "severity": "warning"}
    assert not {"RerankerTargetDown", "RerankerHighErrorRate", "RerankerRedisErrors"} & set(alerts)


def test_every_alert_signal_returns_data(scraped: Scraped) -> None:
    for rule in alert_rules():
        scraped.query(rule["expr"])
        assert scraped.query(signal(rule["expr"])), f"{rule['alert']}: no data for {rule['expr']}"


def test_adapter_rules_serve_both_signals_per_pod(scraped: Scraped) -> None:
    values = yaml.safe_load((PROM_DIR / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert {r["name"]["as"] for r in rules} == {"reranker_queue_depth", "reranker_inflight_requests"}
    for rule in rules:
        series = scraped.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
        assert {s["pod"] for s in series} == set(PODS), rule["seriesQuery"]
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
        # What the adapter sends for `kubectl get --raw .../namespaces/search/pods/*/METRIC`.
        name = rule["name"]["matches"].strip("^$")
        expr = (rule["metricsQuery"].replace("<<.Series>>", name)
                .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS)}"')
                .replace("<<.GroupBy>>", "pod"))
        result = scraped.query(expr)
        assert {r["metric"]["pod"] for r in result} == set(PODS), expr


def test_keda_query_returns_data(scraped: Scraped) -> None:
    scaled = yaml.safe_load((PROM_DIR / "keda-scaledobject.yaml").read_text())
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "reranker.dev/v1alpha1",
                                                "kind": "RerankerDeployment", "name": SERVICE}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    result = scraped.query(trigger["metadata"]["query"])
    assert len(result) == 1, result


def test_dashboards_are_portable() -> None:
    """A stable uid, and the datasource as a variable everywhere (no instance's uid inside)."""
    assert DASHBOARDS
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] == "reranker-fleet"
        assert "id" not in dash or dash["id"] is None
        (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        assert ds["name"] == "datasource" and ds["query"] == "prometheus"
        for panel in dashboard_panels(dash):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        # Every metric of the contract the dashboard is meant to show is on it.
        exprs = " ".join(dashboard_exprs())
        for metric in ("reranker_requests_total", "reranker_request_duration_seconds_bucket",
                       "reranker_queue_wait_seconds_bucket", "reranker_inference_duration_seconds_bucket",
                       "reranker_queue_depth", "reranker_inflight_requests",
                       "reranker_batch_size_bucket", "reranker_batch_tokens_bucket",
                       "reranker_pairs_scored_total", "reranker_tokens_total",
                       "reranker_cache_hits_total", "reranker_cache_misses_total",
                       "reranker_rejected_total", "reranker_model_info"):
            assert metric in exprs, metric
        # ... and every metric of the gateway's (its row).
        for metric in (gateway_metrics.REQUESTS, gateway_metrics.REQUEST_DURATION,
                       gateway_metrics.HOLD, gateway_metrics.HELD, gateway_metrics.RETRIES,
                       gateway_metrics.FANOUT_WIDTH, gateway_metrics.AFFINITY,
                       gateway_metrics.UPSTREAM, gateway_metrics.WAKES):
            assert metric in exprs, metric
