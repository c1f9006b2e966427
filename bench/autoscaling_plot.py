"""Plot a recorded autoscaling run: replicas and queue depth over time, with the timeline.

tests/e2e/test_autoscaling.py records one run of the closed loop (bounded load → queue depth
in Prometheus → prometheus-adapter → HPA → the RerankerDeployment's scale subresource → the
operator → Ready pods, and back) as JSON: a sample per second and the timeline's events. This
renders it for docs/autoscaling.md:

    .venv/bin/python bench/autoscaling_plot.py RECORD.json docs/autoscaling.png

Top: the RerankerDeployment's spec.replicas (what the HPA asked for) and its Ready pods, with
an arrow per added pod from the HPA's decision (spec.replicas reaching it) to that pod Ready
(Ready pods reaching it), labelled with the seconds between (samples a second apart: +-1 s).
Bottom: the queue depth summed over the pods right now (Prometheus, raw gauge), the per-pod
value the HPA acted on (custom metrics API: the adapter rule's 1 m average), and the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

EVENT_LABELS = {
    "load_start": "load starts",
    "metric_visible": "metric visible",
    "scaled_up": "HPA scales up",
    "pods_ready": "pods Ready",
    "load_stop": "load stops",
    "scaled_down": "HPA scales down",
    "back_to_min": "back to min",
}


def series(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    return [t for t, _ in points], [v for _, v in points]


def added_pods(record: dict[str, Any]) -> list[tuple[int, float, float | None]]:
    """(k, t the HPA asked for a k-th pod, t k pods were Ready) for each pod the scale-up added."""
    samples = record["samples"]

    def first(key: str, k: int) -> float | None:
        return next((s["t"] for s in samples if (s.get(key) or 0) >= k), None)

    out = []
    for k in range(record["min_replicas"] + 1, record["max_replicas"] + 1):
        asked = first("spec_replicas", k)
        if asked is not None:
            out.append((k, asked, first("ready_replicas", k)))
    return out


def plot(record: dict[str, Any], out: Path) -> None:
    samples = record["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    for key, label, style in (("spec_replicas", "spec.replicas (HPA)", "-"),
                              ("ready_replicas", "Ready pods", "--")):
        t, v = series(samples, key)
        top.step(t, v, style, where="post", label=label, linewidth=2)
    for k, asked, ready in added_pods(record):
        if ready is None:
            continue
        top.annotate("", xy=(ready, k - 0.25), xytext=(asked, k - 0.25),
                     arrowprops={"arrowstyle": "->", "color": "tab:red", "linewidth": 1})
        # above a long arrow; right of a short one (it would sit on the event lines)
        long = ready - asked >= 15
        top.annotate(f"pod {k}: HPA -> Ready {ready - asked:.0f} s",
                     ((asked + ready) / 2 if long else ready, k - 0.25),
                     xytext=(0, 2) if long else (6, 0), textcoords="offset points",
                     va="bottom" if long else "center", ha="center" if long else "left",
                     fontsize=7, color="tab:red", backgroundcolor="white")
    top.set_ylabel("replicas")
    top.set_ylim(0, record["max_replicas"] + 0.5)
    top.set_yticks(range(0, record["max_replicas"] + 1))
    top.legend(loc="center right")
    top.grid(alpha=0.3)

    t, v = series(samples, "queue_depth_total")
    bottom.plot(t, v, label="queue depth, all pods (raw gauge)", alpha=0.6)
    t, v = series(samples, "hpa_metric")
    bottom.plot(t, v, label="per-pod value the HPA used (1 m average)", linewidth=2)
    bottom.axhline(record["target"], color="grey", linestyle=":",
                   label=f"target {record['target']} pairs per pod")
    bottom.set_ylabel("pairs waiting")
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)

    for name, when in record["events"].items():
        if when is None:
            continue
        for ax in (top, bottom):
            ax.axvline(when, color="black", alpha=0.25, linewidth=1)
        top.annotate(EVENT_LABELS.get(name, name), (when, record["max_replicas"] + 0.45),
                     rotation=90, fontsize=7, va="top", ha="right")
    fig.suptitle(f"RerankerDeployment autoscaling on queue depth "
                 f"(min {record['min_replicas']}, max {record['max_replicas']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path, help="JSON written by tests/e2e/test_autoscaling.py")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    record = json.loads(args.record.read_text())
    plot(record, args.out)
    for k, asked, ready in added_pods(record):
        took = f"{ready - asked:.1f} s" if ready is not None else "never Ready"
        print(f"pod {k}: HPA asked at {asked:.1f} s, Ready at {ready} s: {took}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
