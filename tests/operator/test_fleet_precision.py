"""One precision per fleet on the operator's side (fleet_precision): the `<rd>-precision`
ConfigMap's records, status.precision, and how the pods and the pass carry them.

The /health bodies are shaped as `reranker serve` answers them (OpenVINO, auto); the real
servers answer them in tests/kube/test_fleet_precision_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from test_reconcile import DEFAULTS, FakeKube, owner

from reranker import contract
from reranker_operator import fleet_precision, manifests, ownership, status
from reranker_operator.fleet_precision import Observation
from reranker_operator.reconcile import Reconciler
from reranker_operator.spec import parse

CPU = {"model": "Intel(R) Xeon(R) Processor", "flags": ["amx_bf16", "amx_int8", "avx2", "avx512f"]}


def record(*, graph: str = "float", hint: str = "bf16", group: int | None = None,
           at: str = "2026-12-07T16:30:55Z", by: str = "pod-a", **more: Any) -> dict[str, Any]:
    return {"graph": graph, "hint": hint, "group": group, "reason": "auto: measured at start",
            "spearman": {"128": 0.9990640260444927}, "speedup": 1.97, "measured_by": by,
            "measured_at": at, **more}


def health(key: str, rec: dict[str, Any], *, numerics: str = "bf16", origin: str = "measured",
           cpu: Any = CPU) -> dict[str, Any]:
    """A server's /health answer: the record it serves plus key, origin, plan and cpu."""
    served = {"origin": origin, "key": key, "plan": numerics, "speedup": rec.get("speedup"),
              "cpu": cpu, **rec}
    return {"status": "healthy", "model": {"model": "sentence-transformers/all-MiniLM-L6-v2",
                                           "backend": "openvino", "dtype": numerics,
                                           "numerics": numerics, "precision_record": served}}


# --- what the pods report ------------------------------------------------------------------

def test_a_pods_report_is_the_record_as_on_disk() -> None:
    rec = record()
    ob = fleet_precision.from_health("pod-a", health("9f0dd8f8202ac1f5934b", rec))
    assert ob is not None
    assert ob.key == "9f0dd8f8202ac1f5934b" and ob.record == rec  # key, origin, plan, cpu gone
    # Byte for byte what precision_record.py writes (json.dumps(plan, sort_keys=True)).
    assert fleet_precision.record_text(ob.record) == json.dumps(rec, sort_keys=True)
    assert ob.pick == "bf16" and ob.source == "pod pod-a"
    assert ob.cpu == "Intel(R) Xeon(R) Processor (amx_bf16, amx_int8, avx512f, avx2)"


def test_nothing_measured_is_no_record() -> None:
    assert fleet_precision.from_health("p", {"status": "healthy", "model": {
        "numerics": "int8-dynamic/group-128", "precision_record": None}}) is None
    assert fleet_precision.from_health("p", {"status": "loading", "model": None}) is None
    # A key that could not name a ConfigMap entry is not taken.
    assert fleet_precision.from_health("p", health("../x", record())) is None
    assert fleet_precision.from_health("p", health("clé", record())) is None
    assert fleet_precision.from_health("p", health("..data", record())) is None


def test_the_pick_and_the_figures_of_a_record() -> None:
    dyn = record(graph="int8-dynamic", hint="f32", group=128)
    assert fleet_precision.pick_of(dyn) == "int8-dynamic/group-128"
    assert fleet_precision.spearman_of(dyn) == 0.9990640260444927
    # A float pick: the per-group Spearman is int8-dynamic's, not the pick's.
    assert fleet_precision.pick_of(record()) == "bf16"
    assert fleet_precision.spearman_of(record()) is None
    assert fleet_precision.pick_of(record(hint="f32")) == "fp32"
    assert fleet_precision.pick_of({"quantization": "none"}) == "fp32"  # the torch runtime's
    assert fleet_precision.spearman_of({"spearman": 0.9995}) == 0.9995
    assert fleet_precision.speedup_of(record()) == 1.97
    assert fleet_precision.cpu_summary(["avx2", "sse4_2", "amx_bf16"]) == "amx_bf16, avx2"
    assert fleet_precision.cpu_summary(None) == "unknown"


def test_the_job_report_is_read_for_the_status_not_the_configmap() -> None:
    rec = record(by="fleet-model-cache-abc-x1")
    report = {"model": "m", "precision": {**rec, "key": "k1", "plan": "bf16",
                                          "cpu": ["amx_bf16", "avx2"],
                                          "reason": "auto: ... [measured]"}}
    job = fleet_precision.from_conversion("fleet-model-cache-abc", report)
    assert job is not None and (job.key, job.pick, job.cpu) == ("k1", "bf16", "amx_bf16, avx2")
    assert job.source == "job fleet-model-cache-abc"
    seen = fleet_precision.observed([job])
    assert fleet_precision.records(None, seen) == {}
    (entry,) = fleet_precision.entries({}, seen, None)
    assert entry["key"] == "k1" and entry["measuredBy"] == "fleet-model-cache-abc-x1"
    # A pod reporting the same key then fills the ConfigMap (its record is the disk's).
    pod = fleet_precision.from_health("p", health("k1", rec))
    seen = fleet_precision.observed([job, pod])
    assert seen["k1"].source == "pod p"
    assert fleet_precision.records(None, seen) == {"k1.json": json.dumps(rec, sort_keys=True)}


# --- the ConfigMap -------------------------------------------------------------------------

def test_a_key_keeps_its_first_record_and_new_keys_join() -> None:
    first = json.dumps(record(by="pod-a"), sort_keys=True)
    later = record(by="pod-b", at="2026-12-07T17:00:00Z")
    other = fleet_precision.from_health("pod-b", health("k1", later))
    dyn = record(graph="int8-dynamic", hint="f32", group=128, by="pod-c")
    amx = fleet_precision.from_health("pod-c", health("k2", dyn, numerics="int8-dynamic/group-128"))
    data = fleet_precision.records({"k1.json": first, "unrelated": "x"},
                                   fleet_precision.observed([other, amx]))
    assert list(data) == ["k1.json", "k2.json"]
    assert data["k1.json"] == first  # the fleet's first writer wins, as in Redis
    assert json.loads(data["k2.json"])["measured_by"] == "pod-c"


def test_the_configmap_keeps_at_most_max_records_oldest_go_first() -> None:
    live = {f"old{i:02d}.json": json.dumps(record(at=f"2026-01-{i + 1:02d}T00:00:00Z"),
                                            sort_keys=True)
            for i in range(fleet_precision.MAX_RECORDS)}
    ancient = fleet_precision.from_health("p", health("now", record(at="2025-01-01T00:00:00Z")))
    data = fleet_precision.records(live, fleet_precision.observed([ancient]))
    assert len(data) == fleet_precision.MAX_RECORDS
    assert "now.json" in data, "a key a pod serves now is never dropped"
    assert "old00.json" not in data and "old01.json" in data


def test_the_configmap_manifest_and_the_pods_mount() -> None:
    body = owner({"model": {"id": "m"}})
    cm = manifests.precision_config_map(body, {"k1.json": "{}"})
    assert cm["metadata"]["name"] == "rr-precision" and cm["data"] == {"k1.json": "{}"}
    assert cm["metadata"]["labels"] == manifests.labels("rr")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    spec = parse({"model": {"id": "m"}})
    dep = manifests.deployment("rr", spec, DEFAULTS)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "precision",
            "configMap": {"name": "rr-precision", "optional": True}} in pod["volumes"]
    assert {"name": "precision", "mountPath": "/etc/reranker/precision", "readOnly": True} in pod[
        "containers"][0]["volumeMounts"]
    settings = manifests.server_settings(spec)
    assert settings["RERANKER_PRECISION_RECORD_DIR"] == "/etc/reranker/precision"
    assert "RERANKER_PRECISION_RECORD_DIR" in contract.ENV_VARS
    # The pods read it: a foreign ConfigMap of that name holds the rollout (NameConflict).
    assert ("ConfigMap", "rr-precision") in ownership.consumed(dep)


# --- the status ----------------------------------------------------------------------------

def test_one_status_entry_per_key() -> None:
    amx = fleet_precision.from_health("pod-a", health("k-amx", record(by="pod-a")))
    dyn = record(graph="int8-dynamic", hint="f32", group=128, by="pod-b",
                 at="2026-12-07T17:00:00Z")
    vnni = fleet_precision.from_health("pod-b", health(
        "k-vnni", dyn, numerics="int8-dynamic/group-128",
        cpu={"model": "AMD EPYC 7B13", "flags": ["avx2", "avx512_vnni"]}))
    seen = fleet_precision.observed([amx, vnni])
    data = fleet_precision.records(None, seen)
    entries = fleet_precision.entries(data, seen, None)
    assert entries == [
        {"key": "k-amx", "pick": "bf16",
         "cpu": "Intel(R) Xeon(R) Processor (amx_bf16, amx_int8, avx512f, avx2)",
         "measuredBy": "pod-a", "measuredAt": "2026-12-07T16:30:55Z", "speedup": 1.97},
        {"key": "k-vnni", "pick": "int8-dynamic/group-128",
         "cpu": "AMD EPYC 7B13 (avx512_vnni, avx2)", "measuredBy": "pod-b",
         "measuredAt": "2026-12-07T17:00:00Z", "spearman": 0.999064, "speedup": 1.97}]
    assert fleet_precision.summary(entries) == "bf16,int8-dynamic/group-128"
    # The pods are gone (scaled to zero): the entries stay, from the records and the last status.
    assert fleet_precision.entries(data, {}, entries) == entries
    # A record whose date the API server would refuse as date-time: left out, not a failed write.
    odd = {"k.json": json.dumps(record(at="yesterday"))}
    assert "measuredAt" not in fleet_precision.entries(odd, {}, None)[0]


def test_status_build_carries_the_entries_and_keeps_them_without_news() -> None:
    entries = [{"key": "k", "pick": "bf16", "cpu": "x", "measuredBy": "p"}]

    def build(o: dict[str, Any], precision: list[dict[str, Any]] | None) -> dict[str, Any]:
        return status.build(o, deployment=None, problems=[], config_hash="h", service_port=8000,
                            now="2024-01-01T00:00:00Z", precision=precision)
    st = build(owner({}), entries)
    assert st["precision"] == entries and st["precisionSummary"] == "bf16"
    assert build(owner({}, status=st), None)["precision"] == entries  # a spec that does not parse
    assert "precision" not in build(owner({}, status=st), [])


# --- the pass ------------------------------------------------------------------------------

def test_the_pass_records_what_the_pods_report_once_and_keeps_it() -> None:
    kube = FakeKube()
    reported: list[Observation | None] = []
    rec = reconciler(kube, lambda _key: reported)
    spec = {"model": {"id": "m"}, "replicas": 1}

    def run() -> Any:
        return asyncio.run(rec.reconcile(owner(spec, status=kube.status), kube.live()))

    run()
    assert ("ConfigMap", "rr-precision") not in kube.objects, "no record, no ConfigMap"
    assert "precision" not in kube.status
    rec_a = record(by="rr-7d9-a")
    reported[:] = [fleet_precision.from_health("rr-7d9-a", health("k1", rec_a))]
    run()
    cm = kube.objects[("ConfigMap", "rr-precision")]
    assert cm["data"] == {"k1.json": json.dumps(rec_a, sort_keys=True)}
    assert [e["key"] for e in kube.status["precision"]] == ["k1"]
    assert kube.status["precisionSummary"] == "bf16"
    # Nothing new: no write. The pods gone: the record and the entry stay.
    writes = len(kube.writes())
    run()
    reported[:] = []
    run()
    assert len(kube.writes()) == writes
    assert kube.objects[("ConfigMap", "rr-precision")]["data"] == cm["data"]
    assert kube.status["precision"][0]["key"] == "k1"
    # The ConfigMap deleted by hand: a pod still reporting it brings it back.
    del kube.objects[("ConfigMap", "rr-precision")]
    reported[:] = [fleet_precision.from_health("rr-7d9-b", health("k1", rec_a))]
    run()
    assert kube.objects[("ConfigMap", "rr-precision")]["data"] == cm["data"]


def reconciler(kube: FakeKube, precision: Any) -> Reconciler:
    return Reconciler(kube, DEFAULTS,  # type: ignore[arg-type]
                      clock=lambda: "2024-01-01T00:00:00Z", events=lambda *a: None,
                      precision=precision)


def test_a_failed_measurement_is_no_figure() -> None:
    """int8-dynamic's Spearman is NaN for a group that failed: the status (JSON) cannot hold it."""
    nan = record(graph="int8-dynamic", hint="f32", group=64, spearman={"64": float("nan")},
                 speedup=float("inf"))
    assert fleet_precision.spearman_of(nan) is None and fleet_precision.speedup_of(nan) is None
    (entry,) = fleet_precision.entries({"k.json": json.dumps(nan)}, {}, None)
    assert "spearman" not in entry and "speedup" not in entry
    json.dumps(entry, allow_nan=False)


def test_the_records_of_an_earlier_spec_go_once_no_pod_serves_them() -> None:
    """A new model (or precision asked, runtime...) has other record keys: its pods never read
    the old records, and the old pick must not stay in the status as if it were the fleet's."""
    kube = FakeKube()
    reported: list[Observation | None] = []
    rec = reconciler(kube, lambda _key: reported)
    old_spec = {"model": {"id": "m-old"}, "replicas": 1}
    new_spec = {"model": {"id": "m-new"}, "replicas": 1}

    def run(spec: dict[str, Any]) -> None:
        asyncio.run(rec.reconcile(owner(spec, status=kube.status), kube.live()))

    old_hash = manifests.config_hash("rr", parse(old_spec))
    new_hash = manifests.config_hash("rr", parse(new_spec))
    old = fleet_precision.from_health("rr-1-a", health("k-old", record(by="rr-1-a")),
                                      config_hash=old_hash)
    reported[:] = [old]
    run(old_spec)
    assert list(kube.objects[("ConfigMap", "rr-precision")]["data"]) == ["k-old.json"]
    # The spec changes; while the old pods roll out they still report theirs: kept.
    run(new_spec)
    assert list(kube.objects[("ConfigMap", "rr-precision")]["data"]) == ["k-old.json"]
    new = fleet_precision.from_health("rr-2-a", health("k-new", record(by="rr-2-a", hint="f32"),
                                                       numerics="fp32"), config_hash=new_hash)
    reported[:] = [old, new]
    run(new_spec)
    assert list(kube.objects[("ConfigMap", "rr-precision")]["data"]) == ["k-new.json", "k-old.json"]
    # The old pods are gone: their record goes, from the ConfigMap and the status.
    reported[:] = [new]
    run(new_spec)
    assert list(kube.objects[("ConfigMap", "rr-precision")]["data"]) == ["k-new.json"]
    assert [(e["key"], e["pick"]) for e in kube.status["precision"]] == [("k-new", "fp32")]
    assert kube.status["precisionSummary"] == "fp32"
    # This spec's record stays when its pods go (scaled to zero), and after a settings change
    # that keeps the key, the new pods' report keeps it.
    reported[:] = []
    run(new_spec)
    assert list(kube.objects[("ConfigMap", "rr-precision")]["data"]) == ["k-new.json"]


def test_stamps_prefer_the_current_spec() -> None:
    a = fleet_precision.from_health("a", health("k", record()), config_hash="h1")
    b = fleet_precision.from_health("b", health("k", record()), config_hash="h2")
    assert fleet_precision.stamps({}, [a, b], current="h2") == {"k": "h2"}
    assert fleet_precision.stamps({}, [b, a], current="h2") == {"k": "h2"}
    # Neither is the current spec: what the ConfigMap said stays (the record goes with its pods).
    assert fleet_precision.stamps({"k": "h0", "j": "h0"}, [a], current="h2") == {"k": "h0",
                                                                              "j": "h0"}
    assert fleet_precision.stamps({}, [a], current="h2") == {"k": "h1"}
    cm = fleet_precision.config_map("rr", {"k.json": "{}"}, {}, stamped={"k": "h2", "gone": "h1"})
    assert fleet_precision.live_stamps(cm) == {"k": "h2"}
    assert fleet_precision.live_stamps({"metadata": {"annotations": {
        fleet_precision.STAMPS_ANNOTATION: "not json"}}}) == {}


def test_the_model_cache_jobs_measurement_reaches_the_status() -> None:
    """spec.model.cache: `reranker convert` measured in the fill Job; its report (the pod's
    termination message) lists the pick before any server pod runs, not in the ConfigMap."""
    kube = FakeKube()
    job_pods: list[dict[str, Any]] = []
    rec = Reconciler(kube, DEFAULTS,  # type: ignore[arg-type]
                     clock=lambda: "2024-01-01T00:00:00Z", events=lambda *a: None,
                     precision=lambda _key: (), cache_pods=lambda _key: job_pods)
    spec = {"model": {"id": "m", "cache": {"size": "1Gi"}}, "replicas": 1}

    def run() -> None:
        asyncio.run(rec.reconcile(owner(spec, status=kube.status), kube.live()))
    run()
    job = next(name for kind, name in kube.objects if kind == "Job")
    kube.objects[("Job", job)]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    measured = record(by=f"{job}-x2k4q")
    report = {"model": "m", "precision": {**measured, "key": "k1", "plan": "bf16",
                                          "cpu": ["amx_bf16", "avx2"], "reason": "auto: ..."}}
    job_pods[:] = [{"job": job, "pod": f"{job}-x2k4q", "exitCode": 0,
                    "message": json.dumps(report)}]
    run()
    assert kube.status["precision"] == [
        {"key": "k1", "pick": "bf16", "cpu": "amx_bf16, avx2", "measuredBy": f"{job}-x2k4q",
         "measuredAt": "2026-12-07T16:30:55Z", "speedup": 1.97}]
    assert ("ConfigMap", "rr-precision") not in kube.objects
