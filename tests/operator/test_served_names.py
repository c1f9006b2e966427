"""spec.model.servedNames: the env the pods get, the names the status publishes, the CRD's rules.

The names must be exactly what the fleet's servers accept (a gateway routes by them), so the
rendered env is fed to the server's own settings and the server's own route helper here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from reranker.backends.model_files import EMBEDDED_MODEL_NAME
from reranker.errors import ModelNotFound
from reranker.routes import _served_model
from reranker.settings import Settings
from reranker_operator import manifests, served_names, status
from reranker_operator.spec import InvalidSpec, parse

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "rerankerdeployments.reranker.dev.yaml"


def settings(**model: Any) -> dict[str, str]:
    return manifests.server_settings(parse({"model": model}))


def test_without_aliases_the_server_keeps_accepting_any_name() -> None:
    rendered = settings(id="cross-encoder/ms-marco-MiniLM-L-6-v2")
    assert served_names.ENV not in rendered
    assert served_names.from_settings(rendered) == ("cross-encoder/ms-marco-MiniLM-L-6-v2",)


def test_aliases_become_the_servers_served_model_names() -> None:
    rendered = settings(id="BAAI/bge-reranker-v2-m3", servedNames=["bge-m3", "multilingual"])
    assert rendered[served_names.ENV] == "BAAI/bge-reranker-v2-m3,bge-m3,multilingual"
    assert served_names.from_settings(rendered) == ("BAAI/bge-reranker-v2-m3", "bge-m3",
                                                    "multilingual")
    # The server reads the variable as the operator means it: these names, and no other.
    server = Settings.model_validate({served_names.ENV: rendered[served_names.ENV]})
    runtime = SimpleNamespace(backend_info=SimpleNamespace(model="BAAI/bge-reranker-v2-m3"),
                              model_names=server.resolved_model_names())
    assert _served_model(runtime, "bge-m3") == "bge-m3"  # type: ignore[arg-type]
    assert _served_model(runtime, None) == "BAAI/bge-reranker-v2-m3"  # type: ignore[arg-type]
    with pytest.raises(ModelNotFound, match="multilingual"):
        _served_model(runtime, "gpt-4")  # type: ignore[arg-type]


def test_the_status_names_the_model_as_the_server_does() -> None:
    # A local folder is called by its path; the embedded model by its hub id.
    assert served_names.from_settings(settings(localPath="/opt/models/ce", servedNames=["ce"])) == (
        "/opt/models/ce", "ce")
    assert served_names.from_settings(settings(pvc={"claimName": "m", "path": "x"})) == (
        "/models/x",)
    assert served_names.loaded_name(model=None, local_path=None) == EMBEDDED_MODEL_NAME
    assert served_names.EMBEDDED_MODEL_ID == EMBEDDED_MODEL_NAME
    # An alias equal to the id is not listed twice.
    assert served_names.from_settings(settings(id="m", servedNames=["m", "a"])) == ("m", "a")


def test_status_always_carries_the_served_names_and_keeps_them_for_a_bad_spec() -> None:
    owner = {"metadata": {"name": "rr", "namespace": "ns", "generation": 1},
             "spec": {"replicas": 1}, "status": {}}
    built = status.build(owner, deployment=None, problems=[], config_hash="h", service_port=8000,
                         now="2024-01-01T00:00:00Z", served_names=("m", "a"))
    assert built["servedNames"] == ["m", "a"]
    # A spec that does not parse (served_names None): the last published names stay.
    again = status.build({**owner, "status": built}, deployment=None, problems=[],
                         config_hash="h", service_port=8000, now="2024-01-01T00:00:00Z")
    assert again["servedNames"] == ["m", "a"]


@pytest.mark.parametrize(("names", "message"), [
    (["a", "a"], "must be unique"),
    ([""], r"servedNames\[0\] must be a non-empty string"),
    (["a,b"], "commas or whitespace"),
    (["a b"], "commas or whitespace"),
    ([f"n{i}" for i in range(17)], "more than 16"),
    ("a", "must be a list"),
])
def test_bad_aliases_are_refused(names: Any, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse({"model": {"id": "m", "servedNames": names}})


def test_crd_rules_are_the_operators() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    prop = schema["spec"]["properties"]["model"]["properties"]["servedNames"]
    assert prop["maxItems"] == served_names.MAX_ALIASES
    assert prop["x-kubernetes-list-type"] == "set"  # the API server refuses duplicates
    assert prop["items"]["maxLength"] == served_names.MAX_NAME_LENGTH
    assert prop["items"]["minLength"] == 1 and prop["items"]["pattern"] == r"^[^,\s]+$"
    assert schema["status"]["properties"]["servedNames"]["items"] == {"type": "string"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Models"] == ".status.servedNames"
