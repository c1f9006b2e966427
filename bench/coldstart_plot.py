"""Plot recorded cold-start runs (bench/coldstart.py): one horizontal timeline per pod.

    .venv/bin/python bench/coldstart_plot.py RECORD.json [RECORD.json ...] docs/coldstart.png

Each pod is a row, x = seconds since what asked for it (the RerankerDeployment created, for the
first pod; the scale request, for the later ones). The bar's segments: waiting to be scheduled,
scheduled -> container started (sandbox, image, container), then the server's own start phases
(imports, model files, convert, compile, precision, warm-up; an older server without /health
`startup` shows its first log line and one "model load", from its log), then model ready -> Ready (the readiness probe's
lag). Several records (before / after) are drawn one above the other on the same x scale.
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
    out = [("to schedule", 0.0, sched), ("container start", sched, started)]
    server = rec["server"]
    model_ready = (server["ready_at"] - t0) if server.get("ready_at") else None
    at = started
    if server.get("source") == "health":
        # The server's clock starts at its own started_at (sub-second); startedAt is whole seconds.
        at = max(started, server["started_at"] - t0) if server.get("started_at") else started
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
    rows: list[tuple[str, dict[str, Any]]] = []
    for record in records:
        for rec in record["pods"]:
            who = "first pod" if rec["role"] == "first" else f"round {rec['round']}: {rec['pod'][-5:]}"
            rows.append((f"{record.get('label') or ''}\n{who}".strip(), rec))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.8))
    seen: set[str] = set()
    for y, (_, rec) in enumerate(rows):
        for name, a, b in segments(rec):
            ax.barh(y, b - a, left=a, color=COLOURS[name], edgecolor="white", linewidth=0.5,
                    label=None if name in seen else name)
            seen.add(name)
        ax.annotate(f"{rec['started_to_ready']:.0f} s", (rec["ready"] - rec["trigger"], y),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the pod was asked for (RD created / scale request); "
                  "label: container started -> Ready")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    title = " vs ".join(
        f"{r.get('label') or 'run'}: first {r['first_started_to_ready']:.0f} s, "
        f"later p50 {r['later_started_to_ready_p50']:.0f} s" for r in records)
    ax.set_title(f"Server pods' cold start, scale 1 -> {records[0]['replicas']} "
                 f"(container started -> Ready)\n{title}", fontsize=9)
    fig.tight_layout()
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
