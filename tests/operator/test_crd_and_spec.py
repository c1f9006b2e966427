"""The CRD and the operator's typed spec agree: same defaults, same rules, same messages.

The API server applies the CRD's defaults and CEL rules; the operator re-applies them in
`spec.parse` (unit tests and older servers). These tests keep the two from drifting apart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from reranker import contract
from reranker_operator import spec as specmod
from reranker_operator.spec import InvalidSpec, parse

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default
    gets it, then objects (present or defaulted) are defaulted recursively."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    out = copy.deepcopy(value)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(prop, out[name])
    return out


def test_crd_names_come_from_the_contract(crd: dict[str, Any]) -> None:
    assert crd["spec"]["group"] == contract.API_GROUP
    assert crd["spec"]["names"]["kind"] == contract.KIND_DEPLOYMENT
    assert crd["spec"]["names"]["plural"] == contract.PLURAL_DEPLOYMENT
    assert crd["spec"]["names"]["shortNames"] == ["rrd"]
    assert [v["name"] for v in crd["spec"]["versions"]] == [contract.API_VERSION]


def test_scale_subresource_paths(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string"
    assert "phase" not in status


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0][
        "additionalPrinterColumns"]}
    assert list(columns) == ["Model", "Device", "Quantization", "Replicas", "Ready",
                             "External", "Status", "Age"]
    assert columns["External"] == ".status.externalEndpoints.ready"
    assert columns["Status"] == '.status.conditions[?(@.type=="Ready")].status'


def test_enums_match_the_operator(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert tuple(props["device"]["enum"]) == specmod.POD_DEVICES
    assert set(specmod.POD_DEVICES) <= set(contract.DEVICES)
    assert "mps" not in props["device"]["enum"] and "mlx" not in props["device"]["enum"]
    assert tuple(props["quantization"]["enum"]) == specmod.QUANTIZATIONS
    assert set(specmod.QUANTIZATIONS) <= set(contract.QUANTIZATIONS)
    assert tuple(props["model"]["properties"]["kind"]["enum"]) == specmod.MODEL_KINDS
    metric = props["autoscaling"]["properties"]["metric"]
    assert tuple(metric["enum"]) == specmod.AUTOSCALING_METRICS


@pytest.mark.parametrize("raw", [
    {"model": {"id": "m"}},
    {"model": {"id": "m"}, "autoscaling": {"enabled": True}},
    {"model": {"id": "m"}, "cache": {"redis": {"managed": {"enabled": True}}}},
    {"model": {"pvc": {"claimName": "models"}}, "monitoring": {"serviceMonitor": {}}},
])
def test_python_defaults_equal_crd_defaults(spec_schema: dict[str, Any], raw: dict) -> None:
    defaulted = apply_defaults(spec_schema, raw)
    assert defaulted != raw  # the CRD does default something
    assert parse(defaulted) == parse(raw)


def test_crd_defaults_cover_the_documented_ones(spec_schema: dict[str, Any]) -> None:
    defaulted = apply_defaults(spec_schema, {"model": {"id": "m"}})
    assert defaulted["replicas"] == specmod.DEFAULT_REPLICAS
    assert defaulted["device"] == "cpu" and defaulted["quantization"] == "none"
    assert defaulted["drainSeconds"] == specmod.DEFAULT_DRAIN_SECONDS
    assert defaulted["service"] == {"type": "ClusterIP", "port": specmod.DEFAULT_SERVICE_PORT}
    assert defaulted["podDisruptionBudget"] == {"enabled": True}
    # Server tunables have no CRD default: the server's own defaults apply.
    assert defaulted["parallelism"] == {}


def _cel_messages(schema: dict[str, Any]) -> list[str]:
    found = [rule["message"] for rule in schema.get("x-kubernetes-validations", ())]
    for prop in (schema.get("properties") or {}).values():
        found += _cel_messages(prop)
    return found


# (spec, the message both the CRD's CEL rule and spec.parse give)
INVALID = [
    ({"device": "cpu", "quantization": "fp16"}, "quantization fp16 needs device cuda"),
    ({"device": "cuda", "quantization": "int8"}, "quantization int8 (dynamic quantization) runs on cpu only"),
    ({"device": "cpu", "gpus": 2}, "gpus applies only to device cuda"),
    ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}},
     "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"),
    ({"autoscaling": {"enabled": True, "metric": "cpu"}},
     "autoscaling on cpu needs resources.requests.cpu"),
    ({"cache": {"redis": {"urlSecretRef": {"name": "r"}, "managed": {"enabled": True}}}},
     "set cache.redis.urlSecretRef or cache.redis.managed.enabled, not both"),
    ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
     "set podDisruptionBudget.minAvailable or maxUnavailable, not both"),
    ({"model": {}}, "model needs id, localPath or pvc"),
    ({"model": {"localPath": "/m", "pvc": {"claimName": "c"}}},
     "set model.localPath or model.pvc, not both"),
    ({"model": {"id": "m", "kind": "cross-encoder", "promptTemplate": "qwen3-reranker"}},
     "model.promptTemplate applies only to LLM rerankers (kind llm or auto)"),
]


@pytest.mark.parametrize("patch,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_specs_are_refused_with_the_crd_message(spec_schema: dict[str, Any],
                                                        patch: dict, message: str) -> None:
    raw = {"model": {"id": "m"}, **patch}
    with pytest.raises(InvalidSpec) as err:
        parse(apply_defaults(spec_schema, raw))
    assert message in str(err.value)
    assert any(message in m for m in _cel_messages(spec_schema)), "no CEL rule says so"


@pytest.mark.parametrize("patch,message", [
    ({"device": "mps"}, "is not a pod device"),
    ({"device": "mlx"}, "is not a pod device"),
    ({"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}},
     "resources.requests.cpu must be less than or equal to resources.limits.cpu"),
    ({"resources": {"limits": {"memory": "lots"}}}, "is not a quantity"),
    ({"env": [{"value": "x"}]}, "env[0] needs a name"),
])
def test_checks_beyond_the_schema(patch: dict, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse({"model": {"id": "m"}, **patch})


def test_valid_combinations_parse() -> None:
    for device, quantization in [("cpu", "none"), ("cpu", "int8"), ("cpu", "bf16"),
                                 ("cuda", "none"), ("cuda", "bf16"), ("cuda", "fp16")]:
        parsed = parse({"model": {"id": "m"}, "device": device, "quantization": quantization})
        assert (parsed.device, parsed.quantization) == (device, quantization)


def test_autoscaling_target_defaults_by_metric() -> None:
    for metric, target in specmod.DEFAULT_TARGETS.items():
        raw = {"model": {"id": "m"}, "autoscaling": {"enabled": True, "metric": metric},
               "resources": {"requests": {"cpu": "1"}}}
        assert parse(raw).autoscaling.effective_target == target


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_are_valid(spec_schema: dict[str, Any], path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    reranker_docs = [d for d in docs if d["kind"] == contract.KIND_DEPLOYMENT]
    for doc in reranker_docs:
        assert doc["apiVersion"] == f"{contract.API_GROUP}/{contract.API_VERSION}"
        parse(apply_defaults(spec_schema, doc["spec"]))
    assert reranker_docs or path.name.startswith("operator-")
