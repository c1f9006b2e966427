"""The OpenVINO backend against PyTorch fp32, its on-disk conversion cache, and the `auto` choices.

Real OpenVINO on this CPU, real conversions of the tiny BERT / XLM-R cross-encoders the tests build
and of the embedded MiniLM bi-encoder. Fidelity of bf16/int8 on the ranking fixture is in
tests/test_quantization.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from servers import running_app  # noqa: E402

from reranker import backends  # noqa: E402
from reranker.backends import Backend, BackendError, DeviceUnavailable, load_backend, pick_runtime, precision  # noqa: E402
from reranker.settings import Settings  # noqa: E402

pytest.importorskip("openvino", reason="openvino is part of the server extra")

PAIRS = [
    ("what is the capital of france", "The capital of France is Paris, a city on the Seine."),
    ("rerankers", "Rerankers score how relevant a document is to a search query."),
    ("kubernetes restarts", " ".join(models.CORPUS[:30])),  # truncated by every model here
    ("a", "b"),
    ("Berlin", "Die Hauptstadt von Deutschland ist Berlin."),
]


def load(model: Path | None, cache: Path, **settings: object) -> Backend:
    return load_backend(Settings(model=str(model) if model else None, warmup_on_start=False, model_cache_dir=cache,
                                 **{"runtime": "openvino", "quantization": "none", **settings}))


def torch_fp32(model: Path | None) -> Backend:
    return load_backend(Settings(model=str(model) if model else None, runtime="torch", device="cpu",
                                 quantization="none", warmup_on_start=False))


def max_diff(a: list[float], b: list[float]) -> float:
    return float(np.max(np.abs(np.array(a) - np.array(b))))


@pytest.mark.parametrize("family,labels", [("bert", 1), ("bert", 2), ("xlmr", 1)])
def test_cross_encoders_match_torch_fp32(family: str, labels: int, tmp_path: Path) -> None:
    build = models.build_tiny_bert if family == "bert" else models.build_tiny_xlmr
    folder = build(tmp_path / "model", num_labels=labels)
    ov, ref = load(folder, tmp_path / "cache"), torch_fp32(folder)
    assert (ov.info.backend, ov.info.dtype, ov.info.kind) == ("openvino", "fp32", "cross-encoder")
    assert ov.pair_lengths(PAIRS) == ref.pair_lengths(PAIRS)
    # one padded batch of mixed lengths, and each pair alone: padding does not change a score
    batched = ov.score(PAIRS)
    assert max_diff(batched, ref.score(PAIRS)) <= 1e-4
    assert max_diff(batched, [ov.score([p])[0] for p in PAIRS]) <= 1e-4


def test_minilm_bi_encoder_matches_torch_fp32_and_bf16_stays_close(tmp_path: Path) -> None:
    ref = torch_fp32(None).score(PAIRS)
    fp32 = load(None, tmp_path)
    assert (fp32.info.kind, fp32.info.dtype) == ("bi-encoder", "fp32")
    assert max_diff(fp32.score(PAIRS), ref) <= 1e-4
    bf16 = load(None, tmp_path, quantization="bf16")
    expected = "bf16" if precision.native_bf16() else "fp32"
    assert bf16.info.dtype == expected
    assert max_diff(bf16.score(PAIRS), ref) <= 0.02


def test_converted_model_is_cached_on_disk_by_fingerprint(tiny_bert: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker.backends import openvino as ov_backend

    first = load(tiny_bert, tmp_path)
    converted = sorted(p.parent.name for p in (tmp_path / "openvino").glob("*/model.xml"))
    assert len(converted) == 1 and converted[0].endswith(first.ir_fingerprint("float"))
    scores = first.score(PAIRS)

    def no_conversion(self: object, graph: str) -> None:
        raise AssertionError("a restart converted the model again")

    monkeypatch.setattr(ov_backend.OpenVINOBackend, "_convert", no_conversion)
    again = load(tiny_bert, tmp_path)  # a restart: read from disk
    assert again.score(PAIRS) == scores
    bf16 = load(tiny_bert, tmp_path, quantization="bf16")  # same graph, another compile hint: no conversion
    assert bf16.info.backend == "openvino"

    # a new runtime version is another fingerprint: converted again, next to the old one
    monkeypatch.undo()
    monkeypatch.setattr(ov_backend.ov, "get_version", lambda: "9999.0")
    load(tiny_bert, tmp_path)
    assert len(list((tmp_path / "openvino").glob("*/model.xml"))) == 2


def test_int8_is_quantized_with_nncf_and_cached(tiny_bert: Path, tmp_path: Path) -> None:
    int8 = load(tiny_bert, tmp_path, quantization="int8")
    assert (int8.info.backend, int8.info.dtype) == ("openvino", "int8")
    folder = next((tmp_path / "openvino").glob("*-int8-*"))
    assert "FakeQuantize" in (folder / "model.xml").read_text() or "FakeConvert" in (folder / "model.xml").read_text()
    assert np.isfinite(int8.score(PAIRS)).all()


def test_int8_dynamic_compresses_weights_and_is_cached(tiny_bert: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker.backends import openvino as ov_backend

    dynamic = load(tiny_bert, tmp_path, quantization="int8-dynamic")
    assert (dynamic.info.backend, dynamic.info.dtype) == ("openvino", "int8-dynamic")
    assert dynamic.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == ov_backend.DYNAMIC_GROUP
    folder = next((tmp_path / "openvino").glob("*-int8-dynamic-*"))
    assert 'element_type="u8"' in (folder / "model.xml").read_text()  # int8 weights (asymmetric: u8 + zero points)
    fp32 = load(tiny_bert, tmp_path)
    scores = dynamic.score(PAIRS)
    assert 0 < max_diff(scores, fp32.score(PAIRS)) <= 0.2  # a tiny random model; MiniLM: tests/test_quantization.py
    assert dynamic.info.fingerprint != fp32.info.fingerprint  # its scores are cached apart from fp32's

    def no_conversion(self: object, graph: str) -> None:
        raise AssertionError("a restart converted the model again")

    monkeypatch.setattr(ov_backend.OpenVINOBackend, "_convert", no_conversion)
    assert load(tiny_bert, tmp_path, quantization="int8-dynamic").score(PAIRS) == scores


@pytest.mark.parametrize("case", ["kept", "ranking lost", "slower"])
def test_auto_keeps_int8_dynamic_only_where_it_holds_the_ranking_and_runs_faster(
        case: str, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration pairs are really scored in fp32 and int8-dynamic; the Spearman floor and the
    speed race are set here (a tiny random model's ranking says nothing about a real one's, and the
    real race is timing)."""
    import reranker.backends.calibration as calibration
    import reranker.backends.openvino as ov_backend

    real_choose, measured = calibration.choose, []

    def choose(score_in: object, candidates: list[str], floor: float = 0.999, **options: object) -> calibration.Choice:
        choice = real_choose(score_in, candidates, floor=-1.0 if case != "ranking lost" else 1.01, **options)  # type: ignore[arg-type]
        measured.append(choice.measured)
        return choice

    def fake_race(candidates: dict[str, object]) -> dict[str, float]:
        if "dynamic" in candidates:
            return {"dynamic": 1.0 if case == "kept" else 2.0, "float": 1.5}
        return {"bf16": 2.0, "none": 1.0}  # the float race (on a CPU with native bf16): fp32

    monkeypatch.setattr(calibration, "choose", choose)
    monkeypatch.setattr(ov_backend, "race", fake_race)
    backend = load(tiny_bert, tmp_path, quantization="auto")
    tried = list(measured[0])
    assert tried == ["int8-dynamic/128"] if case != "ranking lost" else tried == [
        f"int8-dynamic/{group}" for group in ov_backend.DYNAMIC_GROUPS]  # fastest first, until one holds
    assert all(-1.0 <= rho <= 1.0 for rho in measured[0].values())  # real Spearman figures
    if case == "kept":
        assert backend.info.dtype == "int8-dynamic"
        assert backend.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 128
        assert backend.info.precision.startswith("auto: int8-dynamic") and "1.50x fp32's speed" in backend.info.precision
    else:
        assert backend.info.dtype == "fp32"
        assert ("int8-dynamic not kept" if case == "ranking lost" else "ran 0.75x fp32's speed") in backend.info.precision
    assert np.isfinite(backend.score(PAIRS)).all()


def test_auto_decides_once_and_a_restart_reads_the_decision(tiny_bert: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision (graph, hint, group) is recorded atomically next to the converted graphs, keyed by
    the CPU's flags: a restart on the same CPU serves it without scoring or timing anything."""
    import reranker.backends.calibration as calibration
    import reranker.backends.openvino as ov_backend

    first = load(tiny_bert, tmp_path, quantization="auto")
    (record,) = (tmp_path / "openvino").glob("precision-*.json")
    plan = json.loads(record.read_text())
    assert plan["reason"] == first.info.precision.split(" [")[0] and plan["measured_by"]
    assert first.info.precision_record is not None and first.info.precision_record["origin"] == "measured"
    assert "group 128 " in first.info.precision  # the int8-dynamic figures are in the record's reason

    def no_measuring(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "choose", no_measuring)
    monkeypatch.setattr(ov_backend, "race", no_measuring)
    again = load(tiny_bert, tmp_path, quantization="auto")
    assert (again.info.dtype, again.info.numerics, again.info.fingerprint) == \
        (first.info.dtype, first.info.numerics, first.info.fingerprint)
    assert again.info.precision_record is not None and again.info.precision_record["origin"] == "recorded on disk"
    assert "recorded on disk: measured by" in again.info.precision
    # another CPU (other instructions) measures again
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(AssertionError, match="measured again"):
        load(tiny_bert, tmp_path, quantization="auto")


@pytest.mark.parametrize("failing", ["compression", "group 128", "every group"])
def test_auto_passes_over_an_int8_dynamic_that_fails(failing: str, tiny_bert: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """NNCF failing on an architecture it cannot compress, or a compile error / out of memory for a
    group size, are injected here (a tiny BERT provokes none of them): `auto` serves the next
    candidate, or the float pick, with a warning; the start never fails."""
    import logging

    import reranker.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "SPEARMAN_FLOOR", -1.0)  # the tiny model's ranking says nothing: all keep it
    monkeypatch.setattr(ov_backend, "race", lambda candidates: {"dynamic": 1.0, "float": 2.0} if "dynamic" in candidates
                        else {"bf16": 2.0, "none": 1.0})
    real_convert, real_compile = ov_backend.OpenVINOBackend._convert, ov_backend.OpenVINOBackend._compile

    def convert(self: object, graph: str) -> object:
        if graph == "int8-dynamic" and failing == "compression":
            raise RuntimeError("nncf: this architecture's weights cannot be compressed")
        return real_convert(self, graph)  # type: ignore[arg-type]

    def compile_(self: object, model: object, hint: str, *, group: int | None = None) -> object:
        if group is not None and (failing == "every group" or group == 128):
            raise MemoryError(f"out of memory compiling groups of {group}")
        return real_compile(self, model, hint, group=group)  # type: ignore[arg-type]

    monkeypatch.setattr(ov_backend.OpenVINOBackend, "_convert", convert)
    monkeypatch.setattr(ov_backend.OpenVINOBackend, "_compile", compile_)
    with caplog.at_level(logging.WARNING):
        backend = load(tiny_bert, tmp_path, quantization="auto")
    assert any(r.levelno == logging.WARNING and ("int8-dynamic" in r.getMessage()) for r in caplog.records)
    if failing == "group 128":
        assert backend.info.numerics == "int8-dynamic/group-64" and "group 128 failed" in backend.info.precision
    else:
        assert backend.info.dtype == "fp32"
        assert ("compression failed" if failing == "compression" else "group 32 failed") in backend.info.precision
    assert np.isfinite(backend.score(PAIRS)).all()


def test_a_recorded_int8_dynamic_that_cannot_be_made_here_serves_fp32(tiny_bert: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet's record says int8-dynamic, but this pod cannot compile it (injected, as above):
    it serves fp32 and says why, rather than failing its start."""
    import reranker.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "SPEARMAN_FLOOR", -1.0)
    monkeypatch.setattr(ov_backend, "race", lambda candidates: {"dynamic": 1.0, "float": 2.0} if "dynamic" in candidates
                        else {"bf16": 2.0, "none": 1.0})
    assert load(tiny_bert, tmp_path, quantization="auto").info.numerics == "int8-dynamic/group-128"
    real_compile = ov_backend.OpenVINOBackend._compile

    def compile_(self: object, model: object, hint: str, *, group: int | None = None) -> object:
        if group is not None:
            raise RuntimeError("this CPU plugin has no dynamic quantization")
        return real_compile(self, model, hint, group=group)  # type: ignore[arg-type]

    monkeypatch.setattr(ov_backend.OpenVINOBackend, "_compile", compile_)
    backend = load(tiny_bert, tmp_path, quantization="auto")
    assert (backend.info.dtype, backend.info.numerics) == ("fp32", "fp32")
    assert "could not be made here (RuntimeError: this CPU plugin has no dynamic quantization): fp32" in backend.info.precision
    assert np.isfinite(backend.score(PAIRS)).all()


def test_int8_float_layers_run_fp32_even_on_a_bf16_cpu(tiny_bert: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Static int8's float layers are not raced to bf16: on an AMX CPU bf16 float layers won the race
    (1.2x) and took int8's fixture fidelity from max abs 0.02 to 0.138 against fp32, which the
    calibration pairs did not show. So int8 runs its other layers fp32 on every CPU, times nothing,
    and records nothing."""
    import reranker.backends.openvino as ov_backend
    monkeypatch.setattr(precision, "native_bf16", lambda: "amx_bf16")
    raced = []
    monkeypatch.setattr(ov_backend, "race", lambda candidates: raced.append(sorted(candidates)) or {})
    int8 = load(tiny_bert, tmp_path, quantization="int8")
    assert raced == []
    assert int8.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert (int8.info.dtype, int8.info.numerics) == ("int8", "int8/float-layers-f32")
    assert int8.info.precision_record is None
    assert np.isfinite(int8.score(PAIRS)).all()


def test_streams_run_forwards_side_by_side_with_the_same_scores(tiny_bert: Path, tmp_path: Path) -> None:
    """One infer request per stream: forwards from several workers at once score what one does."""
    from concurrent.futures import ThreadPoolExecutor

    backend = load(tiny_bert, tmp_path)
    sized = backend.sizing()
    streams = int(backend.compiled.get_property("NUM_STREAMS"))
    assert sized.spread and sized.max_parallel == streams >= 1
    alone = backend.score(PAIRS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda _: backend.score(PAIRS), range(8)))
    assert all(max_diff(alone, other) < 1e-6 for other in together)
    one = load(tiny_bert, tmp_path, max_parallel=1)  # RERANKER_MAX_PARALLEL is the stream count
    assert int(one.compiled.get_property("NUM_STREAMS")) == 1 and one.sizing().max_parallel == 1
    assert max_diff(alone, one.score(PAIRS)) < 1e-5


def test_unwritable_cache_still_serves(tiny_bert: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    backend = load(tiny_bert, blocker / "cache")  # cannot be created: converted in memory, with a warning
    assert len(backend.score(PAIRS)) == len(PAIRS)


def test_auto_precision_follows_the_cpu_flags() -> None:
    assert precision.resolve("auto", device="cpu", flags=frozenset({"avx2", "avx512_bf16"})).quantization == "bf16"
    assert precision.resolve("auto", device="cpu", flags=frozenset({"avx2", "amx_bf16"})).quantization == "bf16"
    no_bf16 = precision.resolve("auto", device="cpu", flags=frozenset({"avx2", "avx512f"}))
    assert no_bf16.quantization == "none" and "no native bf16" in no_bf16.reason
    assert precision.resolve("auto", device="cuda").quantization == "none"
    assert precision.resolve("int8", device="cpu").quantization == "int8"  # asked for: as asked


def test_auto_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_apple_silicon", lambda: False)
    monkeypatch.setattr(backends, "_gpu_present", lambda: False)
    assert pick_runtime(Settings(runtime="auto", device="auto")) == "openvino"  # a CPU node
    assert pick_runtime(Settings(runtime="auto", device="cpu")) == "openvino"
    assert pick_runtime(Settings(runtime="torch", device="cpu")) == "torch"
    assert pick_runtime(Settings(runtime="auto", device="mlx")) == "mlx"
    monkeypatch.setattr(backends, "_gpu_present", lambda: True)
    assert pick_runtime(Settings(runtime="auto", device="auto")) == "torch"  # a GPU node
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name: None if name == "openvino" else real_find_spec(name))
    assert pick_runtime(Settings(runtime="auto", device="cpu")) == "torch"  # not installed: torch
    with pytest.raises(DeviceUnavailable, match=r"openvino is not installed: pip install 'reranker-fleet\[openvino\]'"):
        pick_runtime(Settings(runtime="openvino"))


def test_openvino_refuses_gpus_and_torch_refuses_int8(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="runs on the CPU"):
        load(tiny_bert, tmp_path, device="cuda", quantization="bf16")
    with pytest.raises(BackendError, match="RERANKER_RUNTIME=openvino"):
        load_backend(Settings(model=str(tiny_bert), runtime="torch", device="cpu", quantization="int8"))
    with pytest.raises(ValueError, match="int8-dynamic is OpenVINO's"):
        Settings(model=str(tiny_bert), runtime="torch", device="cpu", quantization="int8-dynamic")
    with pytest.raises(ValueError, match="int8-dynamic is OpenVINO's"):
        Settings(model=str(tiny_bert), device="cuda", quantization="int8-dynamic")


async def test_defaults_serve_openvino_at_auto_precision(tiny_bert: Path, tmp_path: Path) -> None:
    """What a user gets on a CPU node with nothing set: OpenVINO, precision picked for this CPU, said so."""
    async with running_app(model=str(tiny_bert), runtime="auto", device="cpu", quantization="auto",
                           model_cache_dir=tmp_path) as client:
        model = (await client.get("/health")).json()["model"]
        assert model["backend"] == "openvino"
        assert model["precision"].startswith("auto:")
        if precision.native_bf16():
            assert model["dtype"] in ("bf16", "fp32", "int8-dynamic") and "measured" in model["precision"]
        else:
            assert model["dtype"] in ("fp32", "int8-dynamic")
        assert "int8-dynamic" in model["precision"]  # tried on calibration pairs: kept or why not
        metrics = (await client.get("/metrics")).text
        assert f'backend="openvino"' in metrics and f'dtype="{model["dtype"]}"' in metrics
        body = (await client.post("/rerank", json={"query": "capital of france", "documents": [d for _, d in PAIRS]})).json()
        assert len(body["results"]) == len(PAIRS)


def test_torch_auto_races_bf16_against_fp32_on_a_bf16_cpu(tiny_bert: Path) -> None:
    backend = load_backend(Settings(model=str(tiny_bert), runtime="torch", device="cpu", quantization="auto",
                                    warmup_on_start=False))
    if precision.native_bf16():
        assert backend.info.dtype in ("bf16", "fp32") and "measured at start" in backend.info.precision
        assert str(next(backend.model.parameters()).dtype) == ("torch.bfloat16" if backend.info.dtype == "bf16"
                                                              else "torch.float32")
    else:
        assert backend.info.dtype == "fp32" and "no native bf16" in backend.info.precision
    assert max_diff(backend.score(PAIRS), torch_fp32(tiny_bert).score(PAIRS)) <= 0.05


def test_the_ir_key_names_openvino_not_torch_or_transformers(tiny_bert: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A slim server (no torch, no transformers) must find the IR the PyTorch image of the same release
    converted: the folder's fingerprint names the model and OpenVINO (+ nncf), not the torch or
    transformers versions. Folders named the old way are never matched: they are ignored, not read."""
    from importlib.metadata import version as real_version

    import reranker.backends.openvino as ov_backend

    backend = load(tiny_bert, tmp_path)
    keys = {graph: backend.ir_fingerprint(graph) for graph in ("float", "int8-dynamic")}
    stale = tmp_path / "openvino" / f"{backend._ir_folder('float').name.rsplit('-', 1)[0]}-0123456789abcdef"
    stale.mkdir()
    (stale / "model.xml").write_text("<not a model/>")  # an old-style folder: never opened
    monkeypatch.setattr(ov_backend, "version", lambda name: "0.0-other" if name in ("torch", "transformers")
                        else real_version(name))
    assert {graph: backend.ir_fingerprint(graph) for graph in keys} == keys
    assert load(tiny_bert, tmp_path).score(PAIRS) == backend.score(PAIRS)
    monkeypatch.setattr(ov_backend, "version", lambda name: "0.0-other" if name == "nncf" else real_version(name))
    assert backend.ir_fingerprint("float") == keys["float"] and backend.ir_fingerprint("int8-dynamic") != keys["int8-dynamic"]
    monkeypatch.setattr(ov_backend.ov, "get_version", lambda: "9999.0")
    assert backend.ir_fingerprint("float") != keys["float"]
