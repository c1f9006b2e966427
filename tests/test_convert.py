"""`reranker convert`: the OpenVINO IR and the precision record made once, ahead of serving.

Real conversions of the tiny BERT cross-encoder in `reranker convert` subprocesses: what the slim
image's build and the operator's cache Job run. The servers that then read the result without
PyTorch are in tests/test_slim_path.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from no_torch import env_without_torch  # noqa: E402
from servers import VENV_BIN  # noqa: E402

pytest.importorskip("openvino", reason="openvino is part of the server extra")

#: The user's defaults (tests/conftest.py sets torch and fp32 for the servers the other tests start).
DEFAULTS = {"RERANKER_RUNTIME": "auto", "RERANKER_QUANTIZATION": "auto"}


def convert(cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "reranker"), "convert", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **DEFAULTS, "RERANKER_MODEL_CACHE_DIR": str(cache), **env})


def test_convert_writes_the_ir_and_the_record_and_reports_one_json_line(tiny_bert: Path, tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "termination-log"
    done = convert(cache, "--termination-log", str(log), RERANKER_MODEL=str(tiny_bert))
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.splitlines()  # one line: logs and progress bars went to stderr
    result = json.loads(line)
    assert json.loads(log.read_text()) == result
    assert (result["model"], result["kind"]) == (str(tiny_bert), "cross-encoder")
    precision = result["precision"]
    assert {"key", "plan", "spearman", "speedup", "cpu", "measured_by", "measured_at"} <= precision.keys()
    assert precision["origin"] == "measured" and precision["plan"] == result["numerics"]
    assert set(precision["cpu"]) == {"model", "flags"}  # as /health's model.precision_record says it
    assert result["seconds"]["convert"] > 0 and result["seconds"]["total"] >= result["seconds"]["convert"]
    folder = cache / "openvino"
    assert json.loads((folder / f"precision-{precision['key']}.json").read_text())["measured_at"] == \
        precision["measured_at"]
    assert result["ir"] and all((Path(ir) / "model.xml").is_file() and Path(ir).parent == folder for ir in result["ir"])
    assert sorted(p.name for p in cache.iterdir()) == ["openvino"]  # no staging left behind
    assert not (folder / "compiled").exists()  # kernels of this machine's CPU stay out of seeds

    # The same settings again: read, not converted or measured; the same fingerprint as `serve` computes.
    again = json.loads(convert(cache, RERANKER_MODEL=str(tiny_bert)).stdout)
    assert again["fingerprint"] == result["fingerprint"] and again["precision"]["key"] == precision["key"]
    assert again["seconds"]["convert"] == 0 and again["seconds"]["precision"] == 0
    assert again["precision"]["measured_at"] == precision["measured_at"]


def test_an_asked_precision_converts_without_a_record(tiny_bert: Path, tmp_path: Path) -> None:
    done = convert(tmp_path, RERANKER_MODEL=str(tiny_bert), RERANKER_QUANTIZATION="none")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["numerics"], result["precision"]["key"], result["precision"]["plan"]) == ("fp32", None, "fp32")
    assert not list((tmp_path / "openvino").glob("precision-*.json"))


def test_convert_without_torch_fails_and_says_why(tiny_bert: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    done = convert(tmp_path / "cache", "--termination-log", str(log), RERANKER_MODEL=str(tiny_bert),
                   **env_without_torch(tmp_path / "no-torch"))
    assert done.returncode == 2 and done.stdout == ""
    assert "reranker convert needs PyTorch and transformers" in done.stderr
    assert "reranker convert needs PyTorch" in json.loads(log.read_text())["error"]


@pytest.mark.parametrize("case", ["unwritable cache", "torch runtime"])
def test_convert_refuses_what_it_cannot_do(case: str, tiny_bert: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    if case == "unwritable cache":
        done = convert(blocker / "cache", RERANKER_MODEL=str(tiny_bert))
        message = "is not writable"
    else:
        done = convert(tmp_path / "cache", RERANKER_MODEL=str(tiny_bert), RERANKER_RUNTIME="torch")
        message = "RERANKER_RUNTIME=torch converts nothing"
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_the_termination_log_keeps_within_kubernetes_4096_bytes(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Kubernetes keeps 4096 bytes of a termination message: a longer result (a long reason, many
    graphs) loses its prose and paths there, never its figures; stdout keeps all of it."""
    from reranker.convert import _report

    result = {"model": "m", "fingerprint": "f", "ir": ["/cache/openvino/" + "x" * 300] * 3,
              "precision": {"key": "k", "plan": "int8-dynamic/group-128", "speedup": 1.9, "reason": "why " * 1000},
              "seconds": {"total": 1.0}}
    log = tmp_path / "termination-log"
    _report(result, log)
    assert json.loads(capsys.readouterr().out) == result
    short = json.loads(log.read_text())
    assert len(log.read_bytes()) <= 4096 and short["precision"] == {"key": "k", "plan": "int8-dynamic/group-128",
                                                                   "speedup": 1.9}
    assert short["ir"] == 3 and short["seconds"] == {"total": 1.0}
