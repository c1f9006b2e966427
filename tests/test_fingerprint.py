"""The cache fingerprint changes whenever the scores can (issue 15.8).

Scores are cached (locally and fleet-wide in Redis) under the backend's fingerprint, so anything
that changes the numbers must change it: the weights' contents in a local folder (a model
retrained in place keeps its file sizes), mixed precision (autocast), and the other numeric
settings. Real backends load real folders here.
"""

from __future__ import annotations

from pathlib import Path

import models


def fingerprint(**settings: object) -> str:
    from reranker.backends import load_backend
    from reranker.settings import Settings

    backend = load_backend(Settings(**settings))
    try:
        return backend.info.fingerprint
    finally:
        backend.close()


def test_weights_replaced_in_place_change_the_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    models.build_tiny_bert(folder, seed=0)
    sizes = sorted((f.name, f.stat().st_size) for f in folder.iterdir())
    first = fingerprint(model=str(folder))
    assert fingerprint(model=str(folder)) == first  # stable for the same contents
    models.build_tiny_bert(folder, seed=1)  # retrained: same shapes, same file sizes, other weights
    assert sorted((f.name, f.stat().st_size) for f in folder.iterdir()) == sizes
    assert fingerprint(model=str(folder)) != first


def test_mixed_precision_changes_the_fingerprint(tiny_bert: Path) -> None:
    plain = fingerprint(model=str(tiny_bert))
    assert fingerprint(model=str(tiny_bert), enable_mixed_precision=True) != plain
    assert fingerprint(model=str(tiny_bert), max_length=64) != plain
    assert fingerprint(model=str(tiny_bert), quantization="bf16") != plain
    # bf16 weights run without autocast: mixed precision changes nothing there, nor the fingerprint
    assert fingerprint(model=str(tiny_bert), quantization="bf16", enable_mixed_precision=True) == \
        fingerprint(model=str(tiny_bert), quantization="bf16")


def test_the_exact_numerics_are_part_of_the_fingerprint(tiny_bert: Path, tmp_path: Path) -> None:
    """int8-dynamic in groups of 128 and of 64 are different numbers: never one cache entry. fp32
    still shares its entries across runtimes (OpenVINO fp32 is within 1e-4 of PyTorch fp32)."""
    import dataclasses

    dynamic = fingerprint_info(model=str(tiny_bert), runtime="openvino", quantization="int8-dynamic",
                               model_cache_dir=tmp_path)
    assert dynamic.numerics == "int8-dynamic/group-64"
    assert dataclasses.replace(dynamic, numerics="int8-dynamic/group-128").fingerprint != dynamic.fingerprint
    int8 = fingerprint_info(model=str(tiny_bert), runtime="openvino", quantization="int8", model_cache_dir=tmp_path)
    assert int8.numerics is not None and int8.numerics.startswith("int8/float-layers-")
    other_layers = "int8/float-layers-bf16" if int8.numerics.endswith("f32") else "int8/float-layers-f32"
    assert dataclasses.replace(int8, numerics=other_layers).fingerprint != int8.fingerprint
    openvino_fp32 = fingerprint_info(model=str(tiny_bert), runtime="openvino", quantization="none", model_cache_dir=tmp_path)
    torch_fp32 = fingerprint_info(model=str(tiny_bert), runtime="torch", device="cpu", quantization="none")
    assert openvino_fp32.numerics == "fp32" and openvino_fp32.fingerprint == torch_fp32.fingerprint


def fingerprint_info(**settings: object) -> "object":
    from reranker.backends import load_backend
    from reranker.settings import Settings

    backend = load_backend(Settings(warmup_on_start=False, **settings))
    try:
        return backend.info
    finally:
        backend.close()
