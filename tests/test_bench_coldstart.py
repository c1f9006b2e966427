"""The cold-start bench's arithmetic (bench/coldstart.py, bench/coldstart_plot.py) and the
autoscaling plot's per-pod figures (bench/autoscaling_plot.py), on the recorded runs in docs/
and on small records built here. The node runs themselves are the bench's (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import autoscaling_plot  # noqa: E402
import coldstart  # noqa: E402
import coldstart_plot  # noqa: E402


def test_kubernetes_whole_seconds_and_runtime_nanoseconds_parse_to_the_same_clock() -> None:
    whole = coldstart.unix("2026-12-07T16:34:18Z")
    assert whole == 1796661258.0
    assert coldstart.unix("2026-12-07T16:34:18.818577123Z") == pytest.approx(whole + 0.818577123)
    assert coldstart.unix("2026-12-07T17:34:18+01:00") == whole
    assert coldstart.unix(None) is None
    with pytest.raises(ValueError):
        coldstart.unix("16:34:18")


def pod(server: dict[str, Any], *, started: float = 102.0, ready: float = 110.0) -> dict[str, Any]:
    return {"pod": "fleet-abc-x1y2z", "role": "later", "round": 1, "trigger": 100.0,
            "created": 100.0, "scheduled": 100.0, "container_started": started, "ready": ready,
            "started_to_ready": ready - started, "server": server}


def test_a_pods_segments_follow_the_servers_own_phases_then_the_probe_lag() -> None:
    seconds = {"imports": 1.2, "model_files": 0.1, "convert": 0.0, "compile": 2.5,
               "precision": 0.0, "warm_up": 0.7, "total": 4.5}
    rec = pod({"source": "health", "started_at": 102.4, "ready_at": 106.9, "seconds": seconds})
    segs = coldstart_plot.segments(rec)
    names = [name for name, _, _ in segs]
    # phases that took no time are not drawn; the server's clock (102.4) beats startedAt's second
    assert names == ["container start", "imports", "model files", "compile", "warm-up", "probe lag"]
    assert segs[1][1] == pytest.approx(2.4)  # seconds since the trigger (100)
    assert segs[-2][2] == pytest.approx(106.9 - 100)
    assert segs[-1] == ("probe lag", pytest.approx(6.9), pytest.approx(10.0))
    assert coldstart.parts(rec) == {k: seconds[k] for k in coldstart.PARTS}


def test_an_older_server_is_read_from_its_log_lines() -> None:
    rec = pod({"source": "log", "first_log_at": 103.0, "ready_at": 108.5, "load_seconds": 5.0})
    segs = coldstart_plot.segments(rec)
    assert [n for n, _, _ in segs] == ["container start", "to first log line", "other",
                                       "model load", "probe lag"]
    assert coldstart.parts(rec) == {"to first log line": 1.0, "model load": 5.0}


def test_the_recorded_runs_print_and_plot(tmp_path: Path) -> None:
    runs = coldstart_plot.load(REPO / "docs" / "coldstart-run.json")
    assert runs and all(r["pods"][0]["role"] == "first" for r in runs)
    for run in runs:
        later = [p["started_to_ready"] for p in run["pods"] if p["role"] == "later"]
        assert run["later_count"] == len(later) >= 5
        assert "started->Ready" in coldstart.table(run)
        assert "p50 of" in coldstart.summary(run)
    out = tmp_path / "coldstart.png"
    coldstart_plot.plot(runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_autoscaling_record_gives_each_added_pod_its_hpa_to_ready_time() -> None:
    record = json.loads((REPO / "docs" / "autoscaling-run.json").read_text())
    added = autoscaling_plot.added_pods(record)
    assert [k for k, _, _ in added] == list(range(record["min_replicas"] + 1, record["max_replicas"] + 1))
    for _, asked, ready in added:
        assert ready is not None and ready > asked
    samples = [{"t": 0.0, "spec_replicas": 1, "ready_replicas": 1},
               {"t": 1.0, "spec_replicas": 3, "ready_replicas": 1},
               {"t": 9.0, "spec_replicas": 3, "ready_replicas": 2}]
    assert autoscaling_plot.added_pods({"samples": samples, "min_replicas": 1, "max_replicas": 3}) \
        == [(2, 1.0, 9.0), (3, 1.0, None)]
