"""One precision per fleet (backends/precision_record.py): measured once, read by every replica.

A real redis-server (tests/redis_fixture.py) is the fleet's shared Redis; real OpenVINO backends
load the tiny BERT cross-encoder as two "pods" with separate cache folders. What is not real:
the outcome of the speed races. They are timing, so their outcome is set here where a test needs
two pods to time differently (what happened in the cold CI run that split a fleet).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest

from reranker.backends import Backend, load_backend
from reranker.backends.precision_record import PrecisionRecord, write_atomically
from reranker.settings import Settings

pytest.importorskip("openvino", reason="openvino is part of the server extra")


def pod(model: Path, cache: Path, redis_url: str | None, **settings: object) -> Backend:
    """A replica's backend as the operator configures it: auto, the fleet's Redis, its own cache volume."""
    return load_backend(Settings(model=str(model), runtime="openvino", quantization="auto", warmup_on_start=False,
                                 model_cache_dir=cache, redis_enabled=redis_url is not None,
                                 redis_url=redis_url or "redis://127.0.0.1:1/0", **settings))


def set_races(monkeypatch: pytest.MonkeyPatch, *, dynamic_wins: bool) -> list[str]:
    """The races' outcome (timing is what differed between the CI pods); returns what was raced."""
    import reranker.backends.openvino as ov_backend

    raced: list[str] = []

    def fake_race(candidates: dict[str, object]) -> dict[str, float]:
        raced.append(",".join(sorted(candidates)))
        if "dynamic" in candidates:
            return {"dynamic": 1.0 if dynamic_wins else 2.0, "float": 1.5}
        return {"bf16": 2.0, "none": 1.0}  # on a CPU with native bf16: fp32

    monkeypatch.setattr(ov_backend, "race", fake_race)
    # The tiny random model's int8 ranking says nothing of a real model's: every candidate keeps it here.
    monkeypatch.setattr(ov_backend, "SPEARMAN_FLOOR", -1.0)
    return raced


def test_replicas_serve_the_first_replicas_pick_whatever_their_own_race_says(
        tiny_bert: Path, tmp_path: Path, redis_server: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pod A measures int8-dynamic faster and records it; pod B, whose race would say fp32, reads
    the record and times nothing: same numerics, same fingerprint, so the fleet's score cache is one.
    (Before: B served fp32 under another fingerprint.)"""
    url = redis_server.url  # type: ignore[attr-defined]
    set_races(monkeypatch, dynamic_wins=True)
    a = pod(tiny_bert, tmp_path / "a", url)
    assert a.info.dtype == "int8-dynamic" and a.info.numerics == "int8-dynamic/group-128"
    raced = set_races(monkeypatch, dynamic_wins=False)
    b = pod(tiny_bert, tmp_path / "b", url)
    assert raced == []  # nothing timed
    assert (b.info.dtype, b.info.numerics, b.info.fingerprint) == (a.info.dtype, a.info.numerics, a.info.fingerprint)
    assert b.info.precision_record is not None and b.info.precision_record["origin"] == "recorded by the fleet (redis)"
    assert "recorded by the fleet (redis): measured by" in b.info.precision
    assert b.score([("a", "b")]) == a.score([("a", "b")])
    # B keeps a copy on its own volume: after a restart it needs no Redis to agree
    assert len(list((tmp_path / "b" / "openvino").glob("precision-*.json"))) == 1


def test_a_disk_record_is_published_to_the_fleet_and_redis_wins_over_the_disk(
        tiny_bert: Path, tmp_path: Path, redis_server: object, monkeypatch: pytest.MonkeyPatch) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    set_races(monkeypatch, dynamic_wins=False)
    alone = pod(tiny_bert, tmp_path / "a", None)  # measured before the fleet had Redis: fp32, on disk
    assert alone.info.dtype == "fp32"
    set_races(monkeypatch, dynamic_wins=True)
    again = pod(tiny_bert, tmp_path / "a", url)  # restarted with Redis: its disk record, published
    assert again.info.dtype == "fp32" and again.info.precision_record["origin"] == "recorded on disk"  # type: ignore[index]
    keys = redis_server.client().keys("reranker:precision:*")  # type: ignore[attr-defined]
    assert len(keys) == 1
    other = pod(tiny_bert, tmp_path / "b", url)  # a new volume, would race to int8-dynamic: Redis says fp32
    assert other.info.fingerprint == alone.info.fingerprint


def test_a_replica_waits_for_one_that_is_measuring(tmp_path: Path, redis_server: object) -> None:
    """A lease says another replica is measuring: wait for its record rather than time again."""
    url = redis_server.url  # type: ignore[attr-defined]
    first = PrecisionRecord("k", folder=tmp_path / "a", redis_url=url, poll_seconds=0.05)
    second = PrecisionRecord("k", folder=tmp_path / "b", redis_url=url, wait_seconds=30, poll_seconds=0.05)
    measuring = threading.Event()

    def slow_measure() -> dict[str, object]:
        measuring.set()
        time.sleep(1.0)
        return {"graph": "float", "hint": "f32", "group": None, "reason": "measured by the first"}

    thread = threading.Thread(target=lambda: first.agree(slow_measure))
    thread.start()
    assert measuring.wait(30)

    def never(*_: object) -> dict[str, object]:
        raise AssertionError("the second replica measured while the first one was measuring")

    started = time.monotonic()
    decision = second.agree(never)
    thread.join()
    assert decision.origin == "recorded by the fleet (redis)" and decision.plan["reason"] == "measured by the first"
    assert time.monotonic() - started < 10


def test_a_replica_measures_itself_when_the_measuring_one_never_records(tmp_path: Path, redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    redis_server.client().set("reranker:precision:k:measuring", "a pod that died", px=60_000)  # type: ignore[attr-defined]
    record = PrecisionRecord("k", folder=tmp_path, redis_url=url, wait_seconds=1.0, poll_seconds=0.05)
    started = time.monotonic()
    decision = record.agree(lambda: {"graph": "float", "hint": "f32", "group": None, "reason": "own"})
    assert 1.0 <= time.monotonic() - started < 10  # waited its bound, then measured
    assert decision.origin == "measured" and decision.plan["reason"] == "own"
    assert json.loads(redis_server.client().get("reranker:precision:k"))["reason"] == "own"  # type: ignore[attr-defined]


def test_redis_down_never_fails_a_start(tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from servers import free_port

    with caplog.at_level(logging.WARNING):
        backend = pod(tiny_bert, tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert backend.info.precision_record["origin"] == "measured"  # type: ignore[index]
    assert any("deciding without the fleet's record" in r.getMessage() for r in caplog.records)


def test_the_record_on_disk_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and renaming leaves the old record whole and no stray file."""
    path = tmp_path / "precision-k.json"
    write_atomically(path, '{"old": 1}')

    def crash(*_: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomically(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_garbled_record_is_measured_again(tmp_path: Path) -> None:
    (tmp_path / "precision-k.json").write_text('{"graph": "flo')  # what a torn write would have left
    decision = PrecisionRecord("k", folder=tmp_path, redis_url=None).agree(lambda: {"reason": "measured"})
    assert decision.origin == "measured"
    assert json.loads((tmp_path / "precision-k.json").read_text())["reason"] == "measured"


def test_the_first_writer_wins_when_two_replicas_measure_at_once(tmp_path: Path, redis_server: object) -> None:
    """Two replicas measuring side by side (the lease expired, or Redis came back midway): the one
    that records second serves the first one's pick, not its own."""
    url = redis_server.url  # type: ignore[attr-defined]
    first = PrecisionRecord("k", folder=tmp_path / "a", redis_url=url)
    second = PrecisionRecord("k", folder=tmp_path / "b", redis_url=url)

    def measured_while_the_other_recorded() -> dict[str, object]:
        redis_server.client().delete("reranker:precision:k:measuring")  # type: ignore[attr-defined]
        first.agree(lambda: {"reason": "first"})
        return {"reason": "second"}

    decision = second.agree(measured_while_the_other_recorded)
    assert decision.plan["reason"] == "first" and decision.origin == "recorded by the fleet (redis)"
    assert json.loads((tmp_path / "b" / "precision-k.json").read_text())["reason"] == "first"


def test_torch_replicas_on_a_bf16_cpu_serve_the_first_replicas_race(
        tiny_bert: Path, tmp_path: Path, redis_server: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """RERANKER_RUNTIME=torch races bf16 against fp32 on a CPU with native bf16: recorded the same way."""
    import reranker.backends.precision as precision
    import reranker.backends.torch as torch_backend

    url = redis_server.url  # type: ignore[attr-defined]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # the race runs
    monkeypatch.setattr(torch_backend, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    raced: list[str] = []

    def race_won_by(winner: str):  # type: ignore[no-untyped-def]
        def fake_race(candidates: dict[str, object]) -> dict[str, float]:
            raced.append(winner)
            return {"bf16": 1.0, "none": 2.0} if winner == "bf16" else {"bf16": 2.0, "none": 1.0}
        return fake_race

    def torch_pod(cache: Path) -> Backend:
        return load_backend(Settings(model=str(tiny_bert), runtime="torch", device="cpu", quantization="auto",
                                     warmup_on_start=False, model_cache_dir=cache, redis_enabled=True, redis_url=url))

    monkeypatch.setattr(torch_backend, "race", race_won_by("bf16"))
    a = torch_pod(tmp_path / "a")
    monkeypatch.setattr(torch_backend, "race", race_won_by("none"))
    b = torch_pod(tmp_path / "b")
    assert raced == ["bf16"]  # the second replica timed nothing
    assert a.info.dtype == b.info.dtype == "bf16" and a.info.fingerprint == b.info.fingerprint
    assert "recorded by the fleet (redis)" in b.info.precision
    assert b.score([("a", "b")]) == a.score([("a", "b")])


def test_a_record_this_version_cannot_read_is_measured_again(tiny_bert: Path, tmp_path: Path,
                                                             redis_server: object) -> None:
    """A record from another version (or garbage) in the fleet's Redis: measured here, never a failed start."""
    url = redis_server.url  # type: ignore[attr-defined]
    first = pod(tiny_bert, tmp_path / "a", url)
    (key,) = redis_server.client().keys("reranker:precision:*")  # type: ignore[attr-defined]
    redis_server.client().set(key, json.dumps({"graph": "int4", "hint": "f16"}))  # type: ignore[attr-defined]
    again = pod(tiny_bert, tmp_path / "b", url)
    assert again.info.precision_record["origin"] == "measured"  # type: ignore[index]
    assert again.info.dtype in ("fp32", "bf16", "int8-dynamic") and first.info.precision_record is not None
    assert all(math.isfinite(score) for score in again.score([("a", "b")]))
