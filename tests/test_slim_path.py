"""The OpenVINO serving path without PyTorch or transformers: the slim CPU image's server.

- Its tokenizer (tokenizer.json read with the `tokenizers` library alone) gives exactly the ids,
  segment ids and masks of transformers' AutoTokenizer, on MiniLM's WordPiece and on an XLM-R
  Unigram tokenizer, for pairs that truncate.
- A server started from a `reranker convert` seed imports neither torch nor transformers (nor
  nncf, which imports torch wherever torch is installed).
- A server in a process where torch and transformers cannot be imported (the venv has them, so a
  sitecustomize hides them: no_torch.py) serves the seed's IR with the same scores, reads
  the precision from the seed or from RERANKER_PRECISION_RECORD_DIR without timing anything, and,
  with no IR anywhere, waits (/health "waiting", /ready 503) until `reranker convert` writes one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from no_torch import env_without_torch  # noqa: E402
from servers import VENV_BIN, ServerFactory  # noqa: E402

from reranker.backends import model_files  # noqa: E402
from reranker.backends.tokenization import HFTokenization  # noqa: E402

pytest.importorskip("openvino", reason="openvino is part of the server extra")

TESTS = Path(__file__).parent
LONG = " ".join(models.CORPUS[:40])
PAIRS = [
    ("what is the capital of france", "The capital of France is Paris, a city on the Seine."),
    ("Berlin", "Die Hauptstadt von Deutschland ist Berlin. La capitale de l'Italie est Rome."),
    ("kubernetes restarts", LONG),  # the document truncates
    (LONG, "a short document"),  # the query truncates
    (LONG, LONG),  # both: longest first
    ("a", "b"),
    ("two  spaces\tand a tab", "lines\n\nand  gaps   between words"),
]
QUERY, DOCUMENTS = "what does a reranker do", [
    "Rerankers score how relevant a document is to a search query.", "The capital of France is Paris.", LONG]
#: What the slim server's process sees: the OpenVINO path and no more.
SLIM_ENV = {"RERANKER_RUNTIME": "auto", "RERANKER_QUANTIZATION": "auto", "WARMUP_ON_START": "true"}


class Tokens(HFTokenization):
    def __init__(self, folder: Path, *, kind: str, max_length: int, transformers: bool) -> None:
        self.files = model_files.describe(folder, name=folder.name, revision="test", kind=kind, max_length=max_length)
        self.max_length = max_length
        self._init_tokenizer(self.files, transformers=transformers)


@pytest.mark.parametrize("family", ["minilm", "bert", "xlmr"])
def test_tokenizer_json_alone_gives_autotokenizers_ids(family: str, tiny_bert: Path, tiny_xlmr: Path,
                                                       minilm: Path) -> None:
    from transformers import AutoTokenizer

    folder = {"minilm": minilm, "bert": tiny_bert, "xlmr": tiny_xlmr}[family]
    reference = AutoTokenizer.from_pretrained(str(folder))
    slim = Tokens(folder, kind="cross-encoder", max_length=64, transformers=False)
    assert slim.tokenizer is None and "transformers" not in type(slim._base_engine).__module__
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    expected = reference(queries, documents, truncation=True, max_length=64, padding=True, return_tensors="np")
    encoded = slim.encode([tuple(p) for p in PAIRS])  # type: ignore[misc]
    assert max(e.tokens for e in encoded) == 64  # the long pairs did truncate
    got = slim.collate_cross(encoded)
    assert np.array_equal(got.input_ids, expected["input_ids"])
    assert np.array_equal(got.attention_mask, expected["attention_mask"])
    if "token_type_ids" in expected:
        assert got.token_type_ids is not None and np.array_equal(got.token_type_ids, expected["token_type_ids"])
    else:  # XLM-R takes no segment ids
        assert got.token_type_ids is None
    assert slim.pad_token_id == reference.pad_token_id  # 1 for XLM-R: padding with 0 would be a real token
    assert slim.special_tokens_per_pair == reference.num_special_tokens_to_add(pair=True)
    texts = [LONG, "Die Hauptstadt", "a", "lines\n\nand  gaps"]
    assert slim.token_counts(texts) == [len(i) for i in reference(texts, add_special_tokens=False)["input_ids"]]
    assert slim.token_offsets(LONG) == [tuple(o) for o in reference(LONG, add_special_tokens=False,
                                                                      return_offsets_mapping=True)["offset_mapping"]]
    single = Tokens(folder, kind="bi-encoder", max_length=64, transformers=False)  # texts on their own
    (pair,) = single.encode([(LONG, "a short document")])  # type: ignore[list-item]
    assert [pair.query, pair.ids] == [reference(t, truncation=True, max_length=64)["input_ids"]
                                      for t in (LONG, "a short document")]


# --- servers from a converted seed --------------------------------------------------------------------

def _convert(cache: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "reranker"), "convert", *args], capture_output=True, text=True,
                          env={**os.environ, **SLIM_ENV, "RERANKER_MODEL_CACHE_DIR": str(cache), **env}, timeout=300)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded MiniLM converted (and its `auto` precision measured) as the slim image's build does."""
    folder = tmp_path_factory.mktemp("seed")
    done = _convert(folder, {})
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture
def hidden_torch(tmp_path: Path) -> dict[str, str]:
    """Env for a process in which torch and transformers cannot be imported (no_torch.py says how)."""
    return env_without_torch(tmp_path / "no-torch")


def _serve(uvicorn_server: ServerFactory, env: dict[str, str], *, wait: bool = True) -> str:
    return uvicorn_server({**SLIM_ENV, **env}, wait=wait).url


def _scores(url: str) -> list[float]:
    response = httpx.post(url + "/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=30)
    assert response.status_code == 200, response.text
    return [r["score"] for r in sorted(response.json()["results"], key=lambda r: r["index"])]


def test_the_serving_path_imports_neither_torch_nor_transformers(seed: Path, tmp_path: Path) -> None:
    """The whole server (app, runtime, OpenVINO backend, tokenizer, precision record) in a fresh
    process, serving MiniLM from the seed: torch, transformers and nncf stay out of sys.modules."""
    script = textwrap.dedent(f'''
        import asyncio, json, sys
        sys.path.insert(0, {str(TESTS)!r})
        from servers import running_app

        async def main():
            async with running_app(model_seed_dirs={str(seed)!r}, model_cache_dir={str(tmp_path / "cache")!r},
                                   runtime="auto", quantization="auto") as client:
                answer = await client.post("/rerank", json={{"query": "q", "documents": ["a", "b"]}})
                health = (await client.get("/health")).json()
            print(json.dumps({{"status": answer.status_code, "backend": health["model"]["backend"],
                              "origin": health["model"]["precision_record"]["origin"],
                              "loaded": sorted(m for m in ("torch", "transformers", "nncf") if m in sys.modules)}}))

        asyncio.run(main())
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **SLIM_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "backend": "openvino", "origin": f"recorded in the seed dir {seed}",
                      "loaded": []}


def test_a_server_without_torch_serves_the_seed_with_the_same_scores(
        seed: Path, tmp_path: Path, hidden_torch: dict[str, str], uvicorn_server: ServerFactory) -> None:
    from reranker.backends import load_backend
    from reranker.settings import Settings

    reference = load_backend(Settings(model_cache_dir=seed, runtime="openvino", quantization="auto",
                                      warmup_on_start=False))
    assert reference.info.precision_record is not None
    assert reference.info.precision_record["origin"] == "recorded on disk"  # the seed is convert's cache dir
    url = _serve(uvicorn_server, {**hidden_torch, "RERANKER_MODEL_SEED_DIRS": f"{tmp_path / 'missing'}:{seed}",
                                  "RERANKER_MODEL_CACHE_DIR": str(tmp_path / "cache")})
    health = httpx.get(url + "/health").json()
    assert (health["model"]["backend"], health["model"]["fingerprint"]) == ("openvino", reference.info.fingerprint)
    assert health["model"]["precision_record"]["origin"] == f"recorded in the seed dir {seed}"
    expected = reference.score([(QUERY, d) for d in DOCUMENTS])  # type: ignore[misc]
    assert np.max(np.abs(np.array(_scores(url)) - np.array(expected))) <= 1e-6
    assert not list((tmp_path / "cache" / "openvino").glob("*/model.xml"))  # nothing converted: read from the seed


def test_a_record_in_the_record_dir_is_served_without_timing(
        seed: Path, tmp_path: Path, hidden_torch: dict[str, str], uvicorn_server: ServerFactory) -> None:
    """The seed holds the IR only; the precision record comes from RERANKER_PRECISION_RECORD_DIR (the
    operator's ConfigMap: `<key>.json`, the bytes the disk record holds)."""
    ir_only, records = tmp_path / "ir-only" / "openvino", tmp_path / "records"
    ir_only.mkdir(parents=True)
    records.mkdir()
    for folder in (seed / "openvino").glob("*/model.xml"):
        shutil.copytree(folder.parent, ir_only / folder.parent.name)
    (record,) = (seed / "openvino").glob("precision-*.json")
    key = record.stem.removeprefix("precision-")
    (records / f"{key}.json").write_bytes(record.read_bytes())
    url = _serve(uvicorn_server, {**hidden_torch, "RERANKER_MODEL_SEED_DIRS": str(ir_only.parent),
                                  "RERANKER_MODEL_CACHE_DIR": str(tmp_path / "cache"),
                                  "RERANKER_PRECISION_RECORD_DIR": str(records)})
    health = httpx.get(url + "/health").json()
    model = health["model"]
    assert health["startup"]["seconds"]["precision"] == 0 and health["startup"]["seconds"]["convert"] == 0
    assert model["precision_record"]["origin"] == f"recorded in RERANKER_PRECISION_RECORD_DIR={records}"
    assert model["precision_record"]["key"] == key
    assert model["precision_record"]["measured_at"] == json.loads(record.read_text())["measured_at"]
    assert len(_scores(url)) == len(DOCUMENTS)


def test_without_torch_or_a_converted_model_the_server_waits_then_loads_what_convert_writes(
        tiny_bert: Path, tmp_path: Path, hidden_torch: dict[str, str], uvicorn_server: ServerFactory) -> None:
    cache = tmp_path / "cache"
    server = uvicorn_server({**SLIM_ENV, **hidden_torch, "RERANKER_MODEL": str(tiny_bert),
                             "RERANKER_MODEL_CACHE_DIR": str(cache)}, wait=False)
    deadline, health = time.monotonic() + 60, {}
    while time.monotonic() < deadline and health.get("status") != "waiting":
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        try:
            health = httpx.get(server.url + "/health", timeout=2).json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert health.get("status") == "waiting", health
    assert "no converted OpenVINO graph" in health["reason"] and "reranker convert" in health["reason"]
    assert health["startup"]["ready_at"] is None
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.json()["reason"] == "waiting"
    assert "PyTorch and transformers are not installed" in ready.json()["message"]
    time.sleep(2.5)  # it keeps waiting (polling), not crashing
    assert server.proc.poll() is None and httpx.get(server.url + "/health").json()["status"] == "waiting"

    done = _convert(cache, {"RERANKER_MODEL": str(tiny_bert)})  # what the operator's Job does, with torch
    assert done.returncode == 0, done.stderr[-3000:]
    server.wait_ready(timeout=30)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "healthy" and health["reason"] is None
    assert health["model"]["precision_record"]["origin"] == "recorded on disk"  # convert's record: nothing timed
    seconds = health["startup"]["seconds"]
    assert seconds["convert"] == 0 and seconds["precision"] == 0 and seconds["total"] > 2.5
    assert health["activity"] == {"requests": 0, "last_request_at": None}
    assert len(_scores(server.url)) == len(DOCUMENTS)
    activity = httpx.get(server.url + "/health").json()["activity"]
    assert activity["requests"] == 1 and time.time() - 30 < activity["last_request_at"] <= time.time()
    log = server.log.read_text()
    assert "waiting for the converted model" in log and "ready in " in log


def test_without_a_record_a_server_without_torch_measures_from_the_float_ir(
        seed: Path, tmp_path: Path, hidden_torch: dict[str, str], uvicorn_server: ServerFactory) -> None:
    """A seed converted on another CPU type (its record's key names other instruction sets) holds
    the float IR only for this one: `auto` is measured here, int8-dynamic compressed by nncf from
    the IR, all without PyTorch."""
    float_only = tmp_path / "float-only" / "openvino"
    float_only.mkdir(parents=True)
    (graph,) = (seed / "openvino").glob("*-float-*/model.xml")
    shutil.copytree(graph.parent, float_only / graph.parent.name)
    url = _serve(uvicorn_server, {**hidden_torch, "RERANKER_MODEL_SEED_DIRS": str(float_only.parent),
                                  "RERANKER_MODEL_CACHE_DIR": str(tmp_path / "cache")})
    health = httpx.get(url + "/health").json()
    assert health["model"]["precision_record"]["origin"] == "measured"
    assert health["startup"]["seconds"]["precision"] > 0 and health["startup"]["seconds"]["convert"] > 0  # nncf
    assert list((tmp_path / "cache" / "openvino").glob("*-int8-dynamic-*/model.xml"))  # compressed here
    assert len(_scores(url)) == len(DOCUMENTS)
