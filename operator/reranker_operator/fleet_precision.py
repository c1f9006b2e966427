"""One precision per fleet, on the operator's side: status.precision and the `<rd>-precision`
ConfigMap, built from what the server pods report.

`RERANKER_QUANTIZATION=auto` measures once per fleet and CPU type and records the pick
(server/reranker/backends/precision_record.py: in the fleet's Redis and the model cache
folder). A fleet without Redis or a shared cache volume had no such memory: each pod measured
again, and the fleet lost its pick when it scaled to zero. The operator therefore keeps it:

- the pods report the record they serve in GET /health (`model.precision_record`: the record
  as written on disk, plus `key`, `origin`, `plan` (the numerics) and `cpu`), read by the
  `pod_health` poller; the model cache's conversion Job (spec.model.cache) reports its
  measurement in its termination message (`from_conversion`: status only, since its `reason`
  is not the record's; its pods read the record from the cache volume itself);
- the `<rd>-precision` ConfigMap, owned by the RerankerDeployment, holds each record as the
  server writes it on disk (`<record key>.json`, `json.dumps(record, sort_keys=True)`). Server
  pods mount it read-only (optional: a missing ConfigMap never blocks a pod) and find it through
  RERANKER_PRECISION_RECORD_DIR, so a later pod reads the fleet's pick instead of timing
  anything. A key already recorded keeps its record (the first writer wins, as in Redis); the
  ConfigMap exists only once there is a record, and keeps at most MAX_RECORDS (the oldest
  measurements go first; a key a pod serves now is never dropped);
- `status.precision` lists one entry per record key (a node with another CPU gets its own:
  the key includes the CPU's instruction-set flags) with the pick, the measured Spearman and
  speed-up where the record has them, who measured it and when; `status.precisionSummary` joins
  the picks for the `Precision` printer column.

Pure functions: the reconciler passes in what the pods reported, the live ConfigMap's data and
the previous status, and gets back the ConfigMap's data and the status entries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Where server pods mount the ConfigMap (RERANKER_PRECISION_RECORD_DIR).
MOUNT_PATH = "/etc/reranker/precision"
VOLUME_NAME = "precision"
ENV_RECORD_DIR = "RERANKER_PRECISION_RECORD_DIR"
#: Records kept per fleet: a key is per model, runtime version, policy and CPU type, so a fleet
#: meets few; the bound keeps a ConfigMap far below its 1 MiB limit (~1 KiB each) whatever
#: happens.
MAX_RECORDS = 16
#: On the ConfigMap: record key -> the config hash (reranker.dev/config-hash) of the pods that
#: served it, so that a spec change drops the records its pods can no longer use.
STAMPS_ANNOTATION = "reranker.dev/precision-config-hashes"
#: Fields /health (and `reranker convert`'s report) add to the record served: not part of the
#: record on disk (where it came from, its key, the numerics it serves, the CPU).
HEALTH_ONLY_FIELDS = frozenset({"origin", "key", "plan", "cpu"})
#: A record key the ConfigMap can hold (a key of ConfigMap data, not starting with a dot: the
#: kubelet keeps `..data` there; the server's keys are hex digests).
_KEY = re.compile(r"[a-zA-Z0-9][-._a-zA-Z0-9]{0,199}")
#: status.precision[].measuredAt is a date-time for the API server: anything else is left out.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
#: CPU flags that change a precision decision (native bf16, int8 dot products, AVX-512).
CPU_FLAGS_THAT_MATTER = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni",
                         "avx512f", "avx2")


def config_map_name(name: str) -> str:
    return f"{name}-precision"


@dataclasses.dataclass(frozen=True)
class Observation:
    """A record one pod (or the conversion Job) reports serving."""

    key: str
    record: Mapping[str, Any]  # exactly what the server writes on disk
    pick: str  # the numerics served: "bf16", "fp32", "int8-dynamic/group-128", ...
    cpu: str  # a readable summary: model name and the flags that matter, or "unknown"
    source: str  # "pod NAME" or "job NAME"
    config_hash: str | None = None  # the reporting pod's reranker.dev/config-hash


# --- reading what the pods and the Job report ---------------------------------------------------

def from_health(pod: str, body: Mapping[str, Any], *,
                config_hash: str | None = None) -> Observation | None:
    """The record a pod's /health answer reports, or None (nothing measured: a precision asked
    for explicitly, a backend without records, a server still loading)."""
    model = body.get("model")
    if not isinstance(model, Mapping):
        return None
    served = model.get("precision_record")
    if not isinstance(served, Mapping):
        return None
    key, record = _split(served)
    if key is None:
        return None
    # The record's pick as the server names it, else as the record says (the same for every
    # pod of the key), else what the pod says it serves.
    pick = served.get("plan") if isinstance(served.get("plan"), str) else pick_of(record)
    numerics = model.get("numerics") or model.get("dtype")
    return Observation(key=key, record=record,
                       pick=str(numerics) if pick in ("", "unknown") and numerics else str(pick),
                       cpu=cpu_summary(served.get("cpu")), source=f"pod {pod}",
                       config_hash=config_hash)


def from_conversion(job: str, report: Mapping[str, Any]) -> Observation | None:
    """The record in a conversion Job's report (`reranker convert`'s JSON line: its
    `precision` object carries the record's fields, `key`, `plan` and the CPU's flags), or None.
    Its `reason` is the server's whole description, not the record's: such an observation
    reaches the status, never the ConfigMap (the Job's pods' volume holds the record itself)."""
    precision = report.get("precision")
    if not isinstance(precision, Mapping):
        return None
    key, record = _split(precision)
    if key is None:
        return None
    plan = precision.get("plan")
    return Observation(key=key, record=record,
                       pick=plan if isinstance(plan, str) and plan else pick_of(record),
                       cpu=cpu_summary(precision.get("cpu")), source=f"job {job}")


def _split(served: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(key, the record as on disk) of what a server reports; a key that cannot name a
    ConfigMap entry is None (the server's keys are hex digests)."""
    key = served.get("key")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return None, {}
    nested = served.get("record")
    if isinstance(nested, Mapping):  # a server that reports the record apart from its own fields
        return key, dict(nested)
    return key, {k: v for k, v in served.items() if k not in HEALTH_ONLY_FIELDS}


def observed(observations: Iterable[Observation | None]) -> dict[str, Observation]:
    """One observation per key: the earliest measurement (the fleet's first writer), a pod's
    before the Job's (a pod reports the record exactly as on disk), then by source."""
    out: dict[str, Observation] = {}
    for ob in sorted((o for o in observations if o is not None),
                     key=lambda o: (str(o.record.get("measured_at") or "~"),
                                    o.source.startswith("job "), o.source)):
        out.setdefault(ob.key, ob)
    return out


def fingerprint(observations: Iterable[Observation | None]) -> tuple[Any, ...]:
    """What a pass does with these pods' reports depends on only this (equal: no pass needed;
    which pod reports what does not matter)."""
    return tuple(sorted({(ob.key, record_text(ob.record), ob.pick, ob.cpu, ob.config_hash or "")
                         for ob in observations if ob is not None}))


# --- what a record says, readably -------------------------------------------------------------

def pick_of(record: Mapping[str, Any]) -> str:
    """The precision a record picks, named as /health's `model.numerics` names it."""
    plan = record.get("plan")
    if isinstance(plan, str) and plan:
        return plan
    graph, hint, group = record.get("graph"), record.get("hint"), record.get("group")
    if graph == "int8-dynamic":
        return f"int8-dynamic/group-{group}"
    if graph == "int8":
        return f"int8/float-layers-{hint}"
    if graph == "float":
        return "bf16" if hint == "bf16" else "fp32"
    quantization = record.get("quantization")  # the torch runtime's record
    if isinstance(quantization, str) and quantization:
        return "fp32" if quantization == "none" else quantization
    return "unknown"


def spearman_of(record: Mapping[str, Any]) -> float | None:
    """The pick's measured Spearman vs fp32: a number, or int8-dynamic's entry for its group.
    None where the record has no figure for the pick (a float pick kept above the floor)."""
    value = record.get("spearman")
    if isinstance(value, Mapping) and record.get("graph") == "int8-dynamic":
        value = value.get(str(record.get("group")))
    return _number(value)


def speedup_of(record: Mapping[str, Any]) -> float | None:
    return _number(record.get("speedup"))


def _number(value: Any) -> float | None:
    """A finite number (a failed measurement is NaN, which JSON, and so the status, cannot hold)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def cpu_summary(cpu: Any) -> str:
    """'MODEL NAME (flag, flag)' from what a server reports of its CPU: a string as is,
    {"model": ..., "flags": [...]} or a list of flags (only the flags that change a decision are
    named)."""
    if isinstance(cpu, str) and cpu.strip():
        return " ".join(cpu.split())[:200]
    if isinstance(cpu, (list, tuple)):
        cpu = {"flags": cpu}
    if isinstance(cpu, Mapping):
        name = " ".join(str(cpu.get("model") or cpu.get("model_name") or "").split())
        flags = cpu.get("flags") or ()
        if isinstance(flags, str):
            flags = flags.split()
        kept = [f for f in CPU_FLAGS_THAT_MATTER if f in set(map(str, flags))]
        text = f"{name} ({', '.join(kept)})" if name and kept else name or ", ".join(kept)
        if text:
            return text[:200]
    return "unknown"


# --- the ConfigMap --------------------------------------------------------------------------------

def record_text(record: Mapping[str, Any]) -> str:
    """A record's file content, exactly as precision_record.py writes it on disk."""
    return json.dumps(dict(record), sort_keys=True)


def stamps(live: Mapping[str, str] | None, reported: Iterable[Observation | None], *,
           current: str | None) -> dict[str, str]:
    """Record key -> the config hash of the pods that serve it: `current` where a pod of the
    current spec reports the key, else what the ConfigMap last said (its STAMPS_ANNOTATION),
    else the reporting pod's."""
    out = dict(live or {})
    mine = [ob for ob in reported if ob is not None and ob.config_hash]
    for ob in mine:
        if ob.config_hash == current or ob.key not in out:
            out[ob.key] = str(ob.config_hash)
    for ob in mine:  # a pod of the current spec wins over an older one met first
        if current is not None and ob.config_hash == current:
            out[ob.key] = current
    return out


def records(live: Mapping[str, str] | None, seen: Mapping[str, Observation], *,
            stamped: Mapping[str, str] | None = None,
            current: str | None = None) -> dict[str, str]:
    """The ConfigMap's data: the live records (a key keeps its first record), then the keys seen
    for the first time; at most MAX_RECORDS, dropping the oldest measurements not seen now.

    A record no pod reports now whose pods ran another spec (`stamped` != `current`: another
    model, precision asked, runtime...) is dropped: its key can never be asked for again by
    this spec's pods, and its pick would only mislead the status. (A record of this spec for
    a CPU type no pod runs on now stays; after a spec change it goes with the rest, and that CPU
    type measures once more.)"""
    data = {k: v for k, v in (live or {}).items() if k.endswith(".json")}
    for key, ob in seen.items():
        if not ob.source.startswith("job "):
            data.setdefault(f"{key}.json", record_text(ob.record))
    if current is not None:
        for name in list(data):
            key = name[:-len(".json")]
            if key not in seen and (stamped or {}).get(key, current) != current:
                del data[name]
    if len(data) > MAX_RECORDS:
        now = {f"{key}.json" for key in seen}
        order = sorted(data, key=lambda k: (k in now, _measured_at(data[k]), k))
        for name in order[:len(data) - MAX_RECORDS]:
            del data[name]
    return dict(sorted(data.items()))


def _measured_at(text: str) -> str:
    try:
        record = json.loads(text)
    except ValueError:
        return ""
    return str(record.get("measured_at") or "") if isinstance(record, dict) else ""


def volume(*, config_map_name: str) -> dict[str, Any]:
    """The pods' volume of the ConfigMap: optional, so that a missing one never blocks a pod
    (the first pods of a fleet start before anything was measured)."""
    return {"name": VOLUME_NAME, "configMap": {"name": config_map_name, "optional": True}}


def volume_mount() -> dict[str, Any]:
    return {"name": VOLUME_NAME, "mountPath": MOUNT_PATH, "readOnly": True}


def config_map(name: str, data: Mapping[str, str], labels: Mapping[str, str], *,
               stamped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `<rd>-precision` ConfigMap (the caller adopts it); `stamped` (record key -> config
    hash of its pods, `stamps`) goes to an annotation, for the next pass."""
    keys = {name[:-len(".json")] for name in data}
    kept = {k: v for k, v in sorted((stamped or {}).items()) if k in keys}
    meta: dict[str, Any] = {"name": config_map_name(name), "labels": dict(labels)}
    if kept:
        meta["annotations"] = {STAMPS_ANNOTATION: json.dumps(kept, sort_keys=True)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(data)}


def live_stamps(cm: Mapping[str, Any] | None) -> dict[str, str]:
    """The STAMPS_ANNOTATION of a live ConfigMap ({} if none or unreadable)."""
    raw = (((cm or {}).get("metadata") or {}).get("annotations") or {}).get(STAMPS_ANNOTATION)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


# --- the status --------------------------------------------------------------------------------

def entries(data: Mapping[str, str], seen: Mapping[str, Observation],
            previous: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """status.precision: one entry per recorded key, in the order they were measured. What a
    pod reports now (its CPU; its served numerics where the record does not name a pick) wins
    over the last status's entry, which wins over what the record alone says."""
    before = {str(e.get("key")): e for e in previous or () if isinstance(e, Mapping)}
    found: dict[str, Any] = {}
    for name, text in data.items():
        try:
            found[name[:-len(".json")]] = json.loads(text)
        except ValueError:
            continue
    for key, job in seen.items():  # the Job's measurement, until a pod's is recorded
        found.setdefault(key, dict(job.record))
    out: list[dict[str, Any]] = []
    for key, record in found.items():
        if not isinstance(record, dict):
            continue
        ob, last = seen.get(key), before.get(key, {})
        cpu = ob.cpu if ob is not None and ob.cpu != "unknown" else (
            last.get("cpu") or cpu_summary(record.get("cpu")))
        entry: dict[str, Any] = {
            "key": key,
            "pick": ob.pick if ob is not None else (last.get("pick") or pick_of(record)),
            "cpu": str(cpu),
            "measuredBy": str(record.get("measured_by") or "unknown"),
            "measuredAt": str(record.get("measured_at") or ""),
        }
        if (spearman := spearman_of(record)) is not None:
            entry["spearman"] = round(spearman, 6)
        if (speedup := speedup_of(record)) is not None:
            entry["speedup"] = round(speedup, 3)
        if not _DATE_TIME.fullmatch(entry["measuredAt"]):
            del entry["measuredAt"]
        out.append(entry)
    return sorted(out, key=lambda e: (e.get("measuredAt", ""), e["key"]))[-MAX_RECORDS:]


def summary(status_entries: Sequence[Mapping[str, Any]]) -> str:
    """The picks, each once, for the `Precision` printer column ("bf16,int8-dynamic/group-128")."""
    picks: list[str] = []
    for e in status_entries:
        if (pick := str(e.get("pick") or "")) and pick not in picks:
            picks.append(pick)
    return ",".join(picks)
