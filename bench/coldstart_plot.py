"""Plot recorded cold-start runs (bench/coldstart.py): one horizontal timeline per pod.

    .venv/bin/python bench/coldstart_plot.py RECORD.json [RECORD.json ...] docs/coldstart.png

Each pod is a row, x = seconds since what asked for it (the RerankerDeployment created, for the
first pod; the scale request, for the later ones). The bar's segments: waiting to be scheduled,
scheduled -> container started (sandbox, image, container), then the server's own start phases
(imports, model files, convert, compile, precision, warm-up; an older server without /health
`startup` shows its first log line and one "model load", from its log), then model ready -> Ready (the readiness probe's
lag). Several records (before / after) are drawn one panel each, one above the other, each on its
own x scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "to schedule": "#d9d9d9",
    "container start": "#969696",
    "imports": "#6baed6",
    "to first log line": "#c6dbef",
    "model files": "#9ecae1",
    "convert": "#fd8d3c",
    "compile": "#e6550d",
    "precision": "#fdd0a2",
    "warm-up": "#74c476",
    "model load": "#fdae6b",
    "other": "#bcbddc",
    "probe lag": "#756bb1",
}
SERVER_PARTS = {"imports": "imports", "model_files": "model files", "convert": "convert",
                "compile": "compile", "precision": "precision", "warm_up": "warm-up"}


def segments(rec: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, start, end) in seconds since the pod's trigger."""
    t0 = rec["trigger"]
    sched, started, ready = rec["scheduled"] - t0, rec["container_started"] - t0, rec["ready"] - t0
    server = rec["server"]
    model_ready = (server["ready_at"] - t0) if server.get("ready_at") else None
    at = started
    if server.get("source") == "health" and server.get("started_at"):
        # The server's clock starts at its own started_at (sub-second); startedAt is whole seconds
        # (truncated): the runtime's start and that truncation count as container start.
        at = max(started, server["started_at"] - t0)
    out = [("to schedule", 0.0, sched), ("container start", sched, at)]
    if server.get("source") == "health":
        for key, name in SERVER_PARTS.items():
            length = float((server.get("seconds") or {}).get(key) or 0.0)
            if length > 0:
                out.append((name, at, at + length))
                at += length
    elif server.get("source") == "log":
        first_log = server["first_log_at"] - t0
        # the app's imports up to uvicorn's first line; torch's come later, in the model load
        out.append(("to first log line", started, first_log))
        load_from = model_ready - server["load_seconds"]
        if load_from > first_log:
            out.append(("other", first_log, load_from))
        out.append(("model load", load_from, model_ready))
        at = model_ready
    if model_ready is not None:
        if model_ready > at + 0.05:
            out.append(("other", at, model_ready))
        out.append(("probe lag", model_ready, max(ready, model_ready)))
    else:
        out.append(("other", at, ready))
    return [(name, a, b) for name, a, b in out if b > a]


def plot(records: list[dict[str, Any]], out: Path) -> None:
    """One panel per run (each on its own x scale: seconds apart from a minute), a row per pod."""
    heights = [len(r["pods"]) + 1.5 for r in records]
    fig, axes = plt.subplots(len(records), 1, figsize=(11, 0.42 * sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    seen: set[str] = set()
    for ax, record in zip(axes[:, 0], records):
        rows = record["pods"]
        for y, rec in enumerate(rows):
            segs = segments(rec)
            for name, a, b in segs:
                ax.barh(y, b - a, left=a, color=COLOURS[name], edgecolor="white", linewidth=0.5,
                        label=None if name in seen else name)
                seen.add(name)
            ax.annotate(f"{rec['started_to_ready']:.0f} s", (max(b for _, _, b in segs), y),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(["first pod" if r["role"] == "first" else f"round {r['round']}: {r['pod'][-5:]}"
                            for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(max(b for _, _, b in segments(r)) for r in rows) * 1.08)
        ax.grid(axis="x", alpha=0.3)
        p50 = record["later_started_to_ready_p50"]
        ax.set_title(f"{record.get('label') or 'run'} ({record['measured_at']}): container started -> Ready: "
                     f"first pod {record['first_started_to_ready']:.0f} s, later pods p50 {p50:.0f} s "
                     f"(of {record['later_count']})", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the pod was asked for (RD created / scale request); "
                           "the label: container started -> Ready (whole seconds, +-1 s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[n]) for n in COLOURS if n in seen]
    fig.legend(handles, [n for n in COLOURS if n in seen], loc="lower center", ncol=6, fontsize=7,
               frameon=False)
    fig.suptitle(f"Server pods' cold start on the dev node, a fleet scaled 1 -> {records[0]['replicas']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load(*paths: Path) -> list[dict[str, Any]]:
    """Runs from files holding one run each or a list of runs (docs/coldstart-run.json)."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.extend(data if isinstance(data, list) else [data])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, nargs="+",
                        help="JSON written by bench/coldstart.py --record (a run, or a list of runs)")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    plot(load(*args.records), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
