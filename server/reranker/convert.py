"""`reranker convert`: convert a model to OpenVINO IR and decide its precision, once, ahead of serving.

Why a command of its own: converting from PyTorch and timing the precision candidates are the slow
parts of a cold start (tens of seconds on 2 CPUs) and need PyTorch, which the slim CPU image does
not carry. Run once (at image build time into /opt/reranker/seed, or by the operator's Job into a
fleet's model-cache volume), every later server start reads the IR and the precision record and
converts and times nothing (backends/openvino.py, backends/precision_record.py).

It reads the same settings as `reranker serve` (env vars and flags) and writes exactly what `serve`
would write into RERANKER_MODEL_CACHE_DIR, through the same backend code, so the two cannot
disagree on names or keys. It works in a staging folder inside the cache dir and moves the results
in at the end, the precision record first and the float graph last: a server waiting for the float
graph (runtime.py) finds the record with it, and never reads half a conversion. The outcome is one
JSON line on stdout, and the same JSON in `--termination-log` (Kubernetes' /dev/termination-log:
the operator reads it from the Job's pod status without reading logs). Logs go to stderr; anything
a library prints meanwhile is sent there too, so stdout holds only that line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import logs
from .backends import BackendError, ConversionNeeded, load_backend
from .backends.precision import cpu_summary
from .backends.precision_record import default_cache_dir
from .settings import Settings

log = logging.getLogger(__name__)

#: Exit codes: the conversion (or the precision measurement) failed; the settings cannot convert.
EXIT_FAILED, EXIT_UNSUITABLE = 3, 2


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Libraries that print (progress bars) print to stderr while this runs: stdout carries one JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LIMIT = 4096


def _report(result: dict[str, Any], termination_log: Path | None) -> None:
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if termination_log is not None:
        if len(line.encode()) > TERMINATION_LIMIT:  # the prose and the paths go; the figures stay
            short = {**result, "ir": len(result["ir"]), "precision": {
                k: v for k, v in result["precision"].items() if k != "reason"}}
            line = json.dumps(short, sort_keys=True)
        try:
            termination_log.write_text(line)
        except OSError as exc:
            log.warning("could not write the termination log %s (%s)", termination_log, exc)


def convert(settings: Settings, *, termination_log: Path | None = None) -> int:
    """Convert and measure as `serve` would; report; 0 on success."""
    logs.configure(settings.log_level)
    started = time.perf_counter()
    if settings.runtime not in ("auto", "openvino"):
        return _fail(f"reranker convert makes OpenVINO IR; RERANKER_RUNTIME={settings.runtime} converts nothing",
                     termination_log, EXIT_UNSUITABLE)
    cache = settings.model_cache_dir or default_cache_dir()
    try:
        (cache / "openvino").mkdir(parents=True, exist_ok=True)
        writable = os.access(cache / "openvino", os.W_OK)
    except OSError:
        writable = False
    if not writable:
        return _fail(f"RERANKER_MODEL_CACHE_DIR={cache} is not writable: reranker convert writes the IR there",
                     termination_log, EXIT_UNSUITABLE)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache))
    # What the cache already holds is read (as a seed), not made again; what is new is made in staging.
    seeds = ":".join([str(cache), settings.model_seed_dirs] if settings.model_seed_dirs else [str(cache)])
    try:
        try:
            with _stdout_to_stderr():
                backend = load_backend(settings.model_copy(update={
                    "runtime": "openvino", "device": "cpu", "model_cache_dir": staging, "model_seed_dirs": seeds}))
        except ConversionNeeded as exc:
            return _fail(f"reranker convert needs PyTorch and transformers (the `server` extra, the -torch image): "
                         f"{exc}", termination_log, EXIT_UNSUITABLE)
        except BackendError as exc:
            return _fail(f"{exc.__class__.__name__}: {exc}", termination_log, EXIT_FAILED)
        except Exception as exc:  # noqa: BLE001 - OpenVINO's converter, NNCF, torch: the Job's pod must say why
            log.exception("conversion failed")
            return _fail(f"conversion failed: {exc.__class__.__name__}: {exc}", termination_log, EXIT_FAILED)
        backend.close()
        _move_in(staging / "openvino", cache / "openvino")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = backend.info
    record = dict(info.precision_record or {})
    # This model's graphs, now in the cache (the backend looks there as in a seed dir).
    folders = sorted(str(xml.parent) for graph in ("float", "int8", "int8-dynamic")
                     if (xml := backend.find_ir(graph)) is not None)  # type: ignore[attr-defined]
    seconds = {**{k: round(v, 3) for k, v in backend.startup.items()}, "total": round(time.perf_counter() - started, 3)}
    result: dict[str, Any] = {
        "model": info.model, "revision": info.revision, "kind": info.kind, "fingerprint": info.fingerprint,
        "dtype": info.dtype, "numerics": info.numerics, "max_length": info.max_length,
        "precision": {**record, "key": record.get("key"), "plan": record.get("plan", info.numerics),
                      "spearman": record.get("spearman"), "speedup": record.get("speedup"),
                      "cpu": cpu_summary(), "reason": info.precision},
        "cache_dir": str(cache), "ir": folders,
        "seconds": seconds,
    }
    _report(result, termination_log)
    log.info("converted %s: %s in %.1f s", info.model, info.numerics, seconds["total"])
    return 0


def _move_in(made: Path, cache: Path) -> None:
    """Move what the conversion made into the cache: records first, then the graphs, the float graph
    last (what a waiting server polls for). A graph already there is the same graph (same
    fingerprint) and stays. OpenVINO's compiled kernels (of every candidate timed, for this
    machine's CPU) are left behind: a server compiles into its own writable cache."""
    for record in sorted(made.glob("precision-*.json")):
        os.replace(record, cache / record.name)
    graphs = sorted((p.parent for p in made.glob("*/model.xml")), key=lambda p: "-float-" in p.name)
    for folder in graphs:
        try:
            os.replace(folder, cache / folder.name)
        except OSError:  # made by another convert meanwhile: the same bytes
            log.info("%s is already in %s", folder.name, cache)


def _fail(message: str, termination_log: Path | None, code: int) -> int:
    print(f"reranker convert: {message}", file=sys.stderr)
    if termination_log is not None:
        try:
            termination_log.write_text(json.dumps({"error": message[-3500:]}))
        except OSError:
            pass
    return code
