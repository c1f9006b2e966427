"""The CRD and the operator's typed spec agree: same defaults, same rules, same messages.

The API server applies the CRD's defaults and CEL rules; the operator re-applies them in
`spec.parse` (unit tests and older servers). These tests keep the two from drifting apart.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import ValidationError

from reranker import contract
from reranker.settings import Settings
from reranker_operator import manifests
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
    assert list(columns) == ["Models", "Device", "Quantization", "Precision", "Replicas",
                             "Ready", "External", "Status", "Age"]
    assert columns["Precision"] == ".status.precisionSummary"
    assert columns["External"] == ".status.externalEndpoints.ready"
    assert columns["Status"] == '.status.conditions[?(@.type=="Ready")].status'


def test_enums_match_the_operator(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert tuple(props["device"]["enum"]) == specmod.POD_DEVICES
    assert set(specmod.POD_DEVICES) <= set(contract.DEVICES)
    assert "mps" not in props["device"]["enum"] and "mlx" not in props["device"]["enum"]
    assert tuple(props["quantization"]["enum"]) == specmod.QUANTIZATIONS
    assert set(specmod.QUANTIZATIONS) <= set(contract.QUANTIZATIONS)
    assert tuple(props["runtime"]["enum"]) == specmod.RUNTIMES
    assert set(specmod.RUNTIMES) <= set(contract.RUNTIMES)
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
    assert defaulted["device"] == "cpu" and defaulted["quantization"] == "auto" and defaulted["runtime"] == "auto"
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
    ({"device": "cuda", "quantization": "int8"}, "quantization int8 and int8-dynamic (OpenVINO) run on cpu only"),
    ({"device": "cuda", "quantization": "int8-dynamic"}, "quantization int8 and int8-dynamic (OpenVINO) run on cpu only"),
    ({"device": "cuda", "runtime": "openvino"}, "runtime openvino runs on cpu only"),
    ({"runtime": "torch", "quantization": "int8"}, "quantization int8 and int8-dynamic run on the openvino runtime"),
    ({"runtime": "torch", "quantization": "int8-dynamic"}, "quantization int8 and int8-dynamic run on the openvino runtime"),
    ({"device": "cpu", "gpus": 2}, "gpus applies only to device cuda"),
    ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}},
     "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"),
    ({"autoscaling": {"enabled": True, "metric": "cpu"}},
     "autoscaling on cpu needs resources.requests.cpu"),
    ({"cache": {"redis": {"urlSecretRef": {"name": "r"}, "managed": {"enabled": True}}}},
     "set cache.redis.urlSecretRef or cache.redis.managed.enabled, not both"),
    ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
     "set podDisruptionBudget.minAvailable or maxUnavailable, not both"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}},
     "rollout.maxSurge and rollout.maxUnavailable may not both be 0"),
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


# --- the CRD's bounds are the server's bounds ------------------------------------------------
# A value the CRD accepts but the server refuses makes pods crash-loop; a value the server
# accepts but the CRD refuses is a setting users cannot reach. So every spec field that the
# operator renders as a server setting must have exactly the bounds of that setting. The
# mapping is not written down here: each numeric CRD field is set in turn, and whichever env
# var `manifests.server_settings` renders from it names the server's pydantic field.

def _leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("type") == "object":
            yield from _leaves(prop, (*path, name))
        else:
            yield (*path, name), prop


def _with(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def _rendered_setting(path: tuple[str, ...], value: Any) -> str | None:
    """The env var the operator renders spec field `path` as, or None."""
    base = {"model": {"id": "m"}}
    before = manifests.server_settings(parse(base))
    try:
        after = manifests.server_settings(parse(_with(base, path, value)))
    except InvalidSpec:  # needs other fields (gpus needs cuda): not a server setting anyway
        return None
    changed = [k for k in after if after.get(k) != before.get(k)]
    assert len(changed) <= 1, (path, changed)
    return changed[0] if changed else None


def _server_field(env: str) -> Any:
    for field in Settings.model_fields.values():
        if env in getattr(field.validation_alias, "choices", ()):
            return field
    return None


def _server_bounds(field: Any, integer: bool) -> dict[str, Any]:
    """The field's bounds as the CRD must write them (OpenAPI v3.0: exclusiveMinimum is a
    flag; for integers, > n is written as >= n + 1)."""
    out: dict[str, Any] = {}
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            out["minimum"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            out.update({"minimum": m.gt + 1} if integer else
                       {"minimum": m.gt, "exclusiveMinimum": True})
        elif isinstance(m, annotated_types.Le):
            out["maximum"] = m.le
        elif isinstance(m, annotated_types.Lt):
            out.update({"maximum": m.lt - 1} if integer else
                       {"maximum": m.lt, "exclusiveMaximum": True})
    return out


def _numeric_settings(spec_schema: dict[str, Any]) -> list[tuple[tuple[str, ...], dict[str, Any], str]]:
    found = []
    for path, prop in _leaves(spec_schema):
        if prop.get("type") not in ("integer", "number") or path[0] in ("replicas",):
            continue
        low = prop.get("minimum", 0)
        env = _rendered_setting(path, max(low, 1) + 16 if prop["type"] == "integer" else 16.5)
        if env is not None and _server_field(env) is not None:
            found.append((path, prop, env))
    return found


def test_crd_bounds_equal_the_servers_bounds(spec_schema: dict[str, Any]) -> None:
    checked = _numeric_settings(spec_schema)
    # The derivation found the tunables the issue names (and would find new ones).
    assert {".".join(p) for p, _, _ in checked} >= {
        "model.maxLength", "parallelism.maxParallel", "parallelism.maxQueue",
        "parallelism.queueTimeoutSeconds", "parallelism.batchSize",
        "parallelism.microBatching.windowMs", "drainSeconds", "cache.ttlSeconds"}
    wrong = {}
    for path, prop, env in checked:
        want = _server_bounds(_server_field(env), integer=prop["type"] == "integer")
        have = {k: prop[k] for k in ("minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum") if k in prop}
        if have != want:
            wrong[".".join(path)] = {"crd": have, f"server ({env})": want}
    assert wrong == {}


def test_crd_enums_are_what_the_server_accepts(spec_schema: dict[str, Any]) -> None:
    """Every value of a CRD enum rendered as a server setting validates in the server, and the
    log levels the server knows are all offered."""
    for path, prop in _leaves(spec_schema):
        if "enum" not in prop or path[0] in ("device", "quantization", "imagePullPolicy"):
            continue  # device/quantization: pod subsets, checked by test_enums_match_the_operator
        env = _rendered_setting(path, prop["enum"][-1])
        if env is None or _server_field(env) is None:
            continue
        for value in prop["enum"]:
            Settings.model_validate({env: value})
    levels = spec_schema["properties"]["logLevel"]
    assert {v.upper() for v in levels["enum"]} == set(contract.LOG_LEVELS)
    for value in levels["enum"]:
        assert Settings.model_validate({"LOG_LEVEL": value}).log_level in contract.LOG_LEVELS
    with pytest.raises(ValidationError, match="LOG_LEVEL"):
        Settings.model_validate({"LOG_LEVEL": "chatty"})
