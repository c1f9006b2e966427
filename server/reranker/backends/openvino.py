"""The OpenVINO backend: Hugging Face cross-encoders and bi-encoders on x86 CPUs, the fast way.

Why a second CPU runtime: on a CPU node OpenVINO runs the same BERT/XLM-R graphs at least as fast
as PyTorch eager at the same precision (fused attention and GEMM kernels chosen for the CPU's
AVX-512/VNNI/AMX units; the gain depends on the CPU), and its int8 path (NNCF post-training quantization of weights *and*
activations) is both faster and far more faithful than torch's deprecated dynamic quantization.
Figures: docs/benchmarks.md.

How, without hand-written graph code:
- the PyTorch model (transformers, fp32) is converted once with `openvino.convert_model`, the
  runtime's own PyTorch frontend, traced on a small example batch with batch and sequence left
  dynamic (any batch of any length runs without recompiling);
- int8: `nncf.quantize` (ModelType.TRANSFORMER: softmax, layer norms and GELU stay in floating
  point) calibrated on data/calibration.json, generic text unrelated to the test fixture;
- int8-dynamic: `nncf.compress_weights` (int8 weights, asymmetric, per output channel; no
  calibration), compiled with DYNAMIC_QUANTIZATION_GROUP_SIZE: OpenVINO quantizes each matrix
  product's activations to int8 at run time, per group of values, and runs it on the CPU's int8
  dot products (VNNI/AMX). The ranges follow each input instead of one calibrated range per
  tensor: Spearman 0.9997 on the fixture against static int8's 0.9987, at 1.9-2.1x fp32 on
  AVX-512 VNNI (docs/openvino.md). `auto` tries it on every model (`_try_dynamic`);
- the result is saved as OpenVINO IR under RERANKER_MODEL_CACHE_DIR, in a folder named by a
  fingerprint of the model (name, revision, kind, max length), the precision of the graph, and the
  versions of openvino (and nncf) that made it: a restart loads the IR and converts nothing, and an
  upgrade converts again. Not the torch/transformers versions: the IR is OpenVINO's own format, and
  a slim server (no PyTorch) must find the IR that the PyTorch image of the same release converted.
  OpenVINO's own compiled-blob cache sits next to it (CACHE_DIR), so the second start also skips
  kernel compilation;
- RERANKER_MODEL_SEED_DIRS are read-only folders of the same layout searched first (the slim
  image's /opt/reranker/seed, a fleet's model-cache volume): IR and precision records found there
  are served without converting or measuring. Without PyTorch (the slim image) a graph found
  nowhere cannot be made: `ConversionNeeded` says which, and the server waits for it (runtime.py).

Precision is a compile-time hint: fp32 sets INFERENCE_PRECISION_HINT=f32 (OpenVINO would otherwise
run bf16 on a bf16-capable CPU), bf16 sets bf16; int8 runs its quantized layers in int8 and the
rest in fp32 (bf16 float layers ran 1.2x faster on an AMX CPU but doubled int8's distance from
fp32's ranking). `info.dtype` reports what the compiled model really uses. Tokenization is the
model's tokenizer.json read with the `tokenizers` library (tokenization.py; no transformers
import), identical to the other runtimes; infer requests are per thread (one per forward worker,
one worker per stream). Thread pools are sized for the CPUs the process may use (cpus.py: a pod's
CPU limit, not the node's cores).

A score depends on its pair alone: batches are padded to a multiple of 16 tokens (WIDTH_MULTIPLE),
so the same pair scores the same bits alone or in any batch, at every precision; `auto` also checks
it at start on calibration pairs before it serves a reduced precision.

What `auto` measures is decided once per fleet: the plan (graph,
hint, group) is recorded in the fleet's Redis and in the cache folder (precision_record.py), and
a later start, on this pod or another, serves the record without timing anything. A candidate
that fails to compress, compile or run is passed over with a warning; `auto` never fails a start.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import calibration, cpus
from .base import Backend, BackendError, BackendInfo, ConversionNeeded, DeviceUnavailable, Encoded, EngineSizing, Pair
from .calibration import SPEARMAN_FLOOR, calibration_pairs
from .model_files import ModelFiles
from .precision import SAMPLE_TEXT, Precision, cpu_flags, cpu_summary, race, raced, resolve, sample_pairs
from .precision_record import Decision, PrecisionRecord, default_cache_dir, record_key
from .tokenization import BiBatch, Features, HFTokenization

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - the `server` extra brings it
    raise DeviceUnavailable("the OpenVINO runtime is not installed: pip install 'reranker-fleet[openvino]' "
                            "(or RERANKER_RUNTIME=torch)") from exc

CALIBRATION_BATCHES, CALIBRATION_BATCH = 12, 8
#: int8-dynamic: int8 weights (asymmetric, per output channel) and activations quantized to int8 at
#: run time in groups of this many values (OpenVINO's dynamic quantization). Smaller groups follow
#: the activations closer and run slower; RERANKER_QUANTIZATION=int8-dynamic uses the middle one,
#: `auto` tries them fastest first and keeps the first that holds the ranking (docs/openvino.md).
DYNAMIC_GROUPS = (128, 64, 32)
DYNAMIC_GROUP = 64
#: Every batch is padded to a multiple of this many tokens. OpenVINO's CPU kernels work on the
#: sequence in blocks of 16 rows and compute the last, partial block another way (int8-dynamic
#: quantizes it differently; bf16 rounds it differently), so a pair's score depended on whether its
#: last tokens fell in a partial block: on how far its batch-mates padded it. With widths rounded to
#: 16, every real token is in a whole block whatever the batch: the scores of a pair alone and in any
#: batch are bit-identical at fp32, bf16 and int8-dynamic (bench/batch_invariance.py).
WIDTH_MULTIPLE = 16
#: `auto` serves a reduced precision only if no calibration pair's score moves by more than this
#: between its batch of 32 and alone (checked at start: another CPU's kernels may block otherwise).
INVARIANCE_TOLERANCE = 1e-4
Graph = Literal["float", "int8", "int8-dynamic"]


def _dynamic(group: int) -> str:
    return f"(int8 weights, activations quantized at run time in groups of {group})"


@dataclass(frozen=True)
class Plan:
    """What serves, decided once (measured or read from the fleet's record): the graph, the
    compile hint of its float layers, int8-dynamic's group size, and why."""

    graph: Graph
    hint: Literal["f32", "bf16"]
    group: int | None
    reason: str
    #: int8-dynamic's measured Spearman vs fp32 on the calibration pairs, per group tried (NaN: failed)
    spearman: dict[str, float] = field(default_factory=dict)
    #: how many times the float pick's speed the served graph ran when measured (None: not timed)
    speedup: float | None = None

    def as_record(self) -> dict[str, Any]:
        return {"graph": self.graph, "hint": self.hint, "group": self.group, "reason": self.reason,
                "spearman": self.spearman, "speedup": self.speedup}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Plan":
        graph, hint, group = record.get("graph"), record.get("hint"), record.get("group")
        if graph not in ("float", "int8", "int8-dynamic") or hint not in ("f32", "bf16") or \
                (group is not None and not isinstance(group, int)) or (graph == "int8-dynamic") != (group is not None):
            raise ValueError(f"not a precision record: {record}")
        spearman, speedup = record.get("spearman") or {}, record.get("speedup")
        return cls(graph, hint, group, str(record.get("reason", "")),
                   {str(k): float(v) for k, v in spearman.items()} if isinstance(spearman, dict) else {},
                   float(speedup) if isinstance(speedup, (int, float)) else None)


class OpenVINOBackend(HFTokenization, Backend):
    """A Hugging Face model converted to OpenVINO IR, compiled for this CPU."""

    #: Batches are padded to a multiple of this many tokens (see `collate`); bench/ sets 1 to
    #: measure the old, unrounded padding.
    width_multiple = WIDTH_MULTIPLE

    def __init__(self, files: ModelFiles, settings: "Settings") -> None:
        if settings.device not in ("auto", "cpu"):
            raise BackendError(f"the OpenVINO backend runs on the CPU, not RERANKER_DEVICE={settings.device}: "
                               "use RERANKER_RUNTIME=torch for GPUs")
        if settings.enable_torch_compile or settings.enable_mixed_precision:
            log.warning("ENABLE_TORCH_COMPILE and ENABLE_MIXED_PRECISION are PyTorch options; the OpenVINO backend "
                        "ignores them (RERANKER_QUANTIZATION sets its precision)")
        if settings.quantization == "fp16":
            raise BackendError("fp16 is not a CPU precision: use bf16 or int8 with the OpenVINO backend")
        self.files = files
        self.streams = settings.max_parallel  # None: OpenVINO sizes its streams for this CPU
        self.max_length = min(settings.max_length, files.max_length)
        #: What this start spent converting, compiling and measuring (seconds; /health `startup`).
        self.startup: dict[str, float] = {"convert": 0.0, "compile": 0.0, "precision": 0.0}
        self._float_speedup: float | None = None  # bf16's speed over fp32's, where the race picked bf16
        self._init_tokenizer(files, transformers=False)
        asked = settings.quantization
        picked = resolve(asked, device="cpu")
        graph: Graph = picked.quantization if picked.quantization in ("int8", "int8-dynamic") else "float"  # type: ignore[assignment]
        self.cache_dir = (settings.model_cache_dir or default_cache_dir()) / "openvino"
        #: Read-only folders of the same layout, searched before cache_dir (RERANKER_MODEL_SEED_DIRS).
        self.seed_dirs = [folder / "openvino" for folder in settings.seed_dirs()]
        self.core = ov.Core()
        self._graphs: dict[str, Any] = {}  # graphs read (or converted) at this start
        self._candidates: dict[tuple[str, str, int | None], Any] = {}  # compiled at this start: the pick is reused
        origin: Decision | None = None
        if asked == "auto":
            # Timed at start (bf16 against fp32; int8-dynamic against the float pick): decided once
            # for the fleet and recorded, so every replica serves the same numerics. Static int8 is
            # not raced: its float layers run fp32 (see _measure).
            key = self.record_key(asked)
            record = PrecisionRecord(
                key, folder=self.cache_dir if self._writable(self.cache_dir) else None,
                redis_url=settings.redis_url if settings.redis_enabled else None, prefix=settings.redis_prefix,
                sources=[(folder / f"precision-{key}.json", f"recorded in the seed dir {folder.parent}")
                         for folder in self.seed_dirs] + ([] if settings.precision_record_dir is None else [
                    (settings.precision_record_dir / f"{key}.json",
                     f"recorded in RERANKER_PRECISION_RECORD_DIR={settings.precision_record_dir}")]))
            measure = functools.partial(self._timed_measure, picked, graph, auto=asked == "auto")
            origin = record.agree(lambda: measure().as_record())
            try:
                plan = Plan.from_record(origin.plan)
            except ValueError as exc:  # a record this version cannot read: measured here, not a failed start
                log.warning("OpenVINO: %s; measuring here", exc)
                plan = measure()
                origin = Decision(plan.as_record(), "measured")
        else:
            plan = Plan(graph, "bf16" if picked.quantization == "bf16" else "f32",
                        DYNAMIC_GROUP if graph == "int8-dynamic" else None, picked.reason)
            if graph == "int8-dynamic":
                plan = replace(plan, reason=f"{plan.reason} {_dynamic(DYNAMIC_GROUP)}")
        compiled, plan = self._compiled(plan)
        self._use(compiled)
        self._graphs, self._candidates = {}, {}  # the candidates not served are freed
        runs = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16" or "f32"
        dtype: str = plan.graph if plan.graph != "float" else ("bf16" if runs == "bf16" else "fp32")
        reason = plan.reason
        if origin is not None:
            reason += f" [{origin.describe()}]"
        if asked == "bf16" and dtype != "bf16":
            reason += f"; this CPU has no native bf16: OpenVINO runs {runs}"
        activation: Literal["sigmoid", "identity"] = "sigmoid" if files.kind == "cross-encoder" else "identity"
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind=files.kind, backend="openvino", device="cpu",
            dtype=dtype, max_length=self.max_length, activation=activation, precision=reason,
            numerics=self._numerics(plan, runs),
            precision_record=None if origin is None else {  # this start's view last: a copied record may carry its own
                **origin.plan, "origin": origin.origin, "key": self.record_key(asked),
                "plan": self._numerics(plan, runs), "speedup": plan.speedup, "cpu": cpu_summary()},
        )

    @staticmethod
    def _numerics(plan: Plan, runs: str) -> str:
        """The exact arithmetic, for the fingerprint: int8-dynamic's group size, int8's float layers."""
        if plan.graph == "int8-dynamic":
            return f"int8-dynamic/group-{plan.group}"
        if plan.graph == "int8":
            return f"int8/float-layers-{runs}"
        return "bf16" if runs == "bf16" else "fp32"

    def record_key(self, asked: str) -> str:
        """What a measured decision depends on: the model (not its precision), the runtime, what
        was asked, the policy and the CPU's instruction set (precision_record.py)."""
        return record_key({
            "model": self.files.name, "revision": self.files.revision, "kind": self.files.kind,
            "max_length": self.max_length, "runtime": "openvino", "openvino": ov.get_version(),
            "asked": asked, "streams": self.streams, "cpu": sorted(cpu_flags()),
            "policy": {"groups": DYNAMIC_GROUPS, "floor": SPEARMAN_FLOOR, "invariance": INVARIANCE_TOLERANCE,
                       "width_multiple": self.width_multiple, "pairs": len(calibration_pairs())},
        })

    def _compiled(self, plan: Plan) -> tuple[Any, Plan]:
        """The compiled model for `plan` (the one measured, or compiled now) and the plan it serves.
        A plan that cannot be made here (NNCF or OpenVINO failing on this model, memory) serves fp32
        with a warning, not a failed start."""
        try:
            return self._candidate(plan.graph, plan.hint, plan.group), plan
        except ConversionNeeded:  # no graph to fall back on either: the server waits for one
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO and NNCF raise plain RuntimeErrors
            if plan.graph == "float" and plan.hint == "f32":
                raise
            log.warning("OpenVINO: %s could not be made here (%s: %s); serving fp32", self._numerics(plan, plan.hint),
                        exc.__class__.__name__, exc)
            return self._candidate("float", "f32"), Plan(
                "float", "f32", None, f"{plan.reason}; but it could not be made here ({exc.__class__.__name__}: {exc}): fp32")

    def _use(self, compiled: Any) -> None:
        """Serve `compiled` (infer requests are per thread and per compiled model)."""
        self.compiled = compiled
        self._output = self._pick_output(compiled)
        self._requests = threading.local()

    def _compile(self, model: Any, hint: str, *, group: int | None = None) -> Any:
        # THROUGHPUT: independent streams, each on its own cores, one infer request each (the
        # batcher runs one forward per stream and spreads a lone request across them). On 2
        # vCPUs two 1-thread streams served 1.08x the pairs/s of one 2-thread stream (LATENCY)
        # on a quiet machine and 1.5-1.8x on a loaded one, where a stream over both vCPUs
        # stalls at every layer whenever one of them is preempted (docs/benchmarks.md).
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT"}
        if self.streams:
            config["NUM_STREAMS"] = str(self.streams)
        if group is not None:  # int8 weights: activations quantized at run time, per group of values
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(group)
        if (threads := cpus.capped()) is not None:  # a pod's CPU limit, not the node's cores
            config["INFERENCE_NUM_THREADS"] = threads
        if self._writable(self.cache_dir):
            config["CACHE_DIR"] = str(self.cache_dir / "compiled")
        started = time.perf_counter()
        try:
            return self.core.compile_model(model, "CPU", config)
        finally:
            self.startup["compile"] += time.perf_counter() - started

    def sizing(self) -> EngineSizing:
        """One forward in flight per stream, the work spread across them (EngineSizing.spread)."""
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        return EngineSizing(max_parallel=max(1, streams), spread=True)

    # --- `auto`: measured once, then recorded -----------------------------------------------------
    def _timed_measure(self, picked: Precision, graph: Graph, *, auto: bool) -> Plan:
        """`_measure`, its seconds counted as `precision` less the converting and compiling it did."""
        started, before = time.perf_counter(), self.startup["convert"] + self.startup["compile"]
        try:
            return self._measure(picked, graph, auto=auto)
        finally:
            other = self.startup["convert"] + self.startup["compile"] - before
            self.startup["precision"] += max(0.0, time.perf_counter() - started - other)

    def _measure(self, picked: Precision, graph: Graph, *, auto: bool) -> Plan:
        """Time (and for int8-dynamic score) the candidates on this CPU: the plan to serve."""
        # Static int8 (never `auto`'s pick) keeps its float layers in fp32: raced to bf16 on an AMX CPU
        # they ran 1.2x faster but took int8's fixture fidelity from Spearman 0.998 / max abs 0.02 to
        # 0.9938 / 0.138 against fp32, and the calibration pairs did not show it (0.9976 both ways).
        hint: Literal["f32", "bf16"] = "bf16" if picked.quantization == "bf16" else "f32"
        reason = picked.reason
        if hint == "bf16":
            # Native bf16 is not always faster (e.g. AVX512-BF16 without AMX, small models): both keep the
            # ranking (Spearman >= 0.999), so measure both on this CPU and keep the faster.
            hint, reason = self._race(graph)
        if auto and hint == "bf16":  # served only if a pair's score does not depend on its batch-mates
            encoded = self.encode(calibration_pairs())
            bf16 = self._candidate(graph, "bf16")
            moved = self.batch_variation(encoded, self._score(encoded, bf16), bf16)
            reason += f"; batch-mates move bf16 scores by {moved:.1e} (tolerance {INVARIANCE_TOLERANCE:.0e})"
            if moved > INVARIANCE_TOLERANCE:
                hint, reason = "f32", f"{reason}: fp32"
        plan = Plan(graph, hint, None, reason, speedup=self._float_speedup if hint == "bf16" else None)
        return self._try_dynamic(plan) if auto else plan

    def _race(self, graph: Graph) -> tuple[Literal["f32", "bf16"], str]:
        """bf16 against fp32 on the same probe batches; the faster stays."""
        bf16, fp32 = (self._candidate(graph, hint) for hint in ("bf16", "f32"))
        seconds = self._time({"bf16": bf16, "none": fp32})
        picked = raced(seconds)
        log.info("OpenVINO: %s", picked.reason)
        self._float_speedup = round(seconds["none"] / seconds["bf16"], 3) if picked.quantization == "bf16" else None
        return ("bf16" if picked.quantization == "bf16" else "f32"), picked.reason

    def _candidate(self, graph: Graph, hint: str, group: int | None = None) -> Any:
        """A candidate compiled once while measuring (the pick is served without compiling again)."""
        key = (graph, hint, group)
        if key not in self._candidates:
            if graph not in self._graphs:
                self._graphs[graph] = self._load_ir(graph)
            self._candidates[key] = self._compile(self._graphs[graph], hint, group=group)
        return self._candidates[key]

    def _time(self, compiled: dict[str, Any]) -> dict[str, float]:
        """Seconds each compiled model takes on the same probe batches (interleaved: `race`)."""
        probe = self._calibration()[:2]

        def run(candidate: Any) -> None:
            request = candidate.create_infer_request()
            for batch in probe:
                request.infer(self._inputs(candidate, batch))

        return race({name: functools.partial(run, c) for name, c in compiled.items()})

    def batch_variation(self, encoded: Sequence[Encoded], batched: Sequence[float], compiled: Any) -> float:
        """The largest change of a score between `batched` (the pairs scored in batches of 32 of
        mixed lengths) and each pair scored alone: what a pair's batch-mates do to its score."""
        alone = [self._score([e], compiled)[0] for e in encoded]
        return float(np.max(np.abs(np.asarray(alone) - np.asarray(batched))))

    def _try_dynamic(self, plan: Plan) -> Plan:
        """`auto`: int8-dynamic where it keeps the ranking, does not depend on batch-mates, and runs
        faster than the float pick.

        How much int8 moves scores depends on the model, so it is measured on it, as on CUDA
        (calibration.py): the calibration pairs scored in fp32 and with each group size, largest
        (fastest) first; the first with Spearman >= 0.999 vs fp32 whose scores stay within
        INVARIANCE_TOLERANCE of each pair scored alone is timed against the float pick on probe
        batches, and serves if faster. A candidate that fails to compress, compile or run (an
        architecture NNCF cannot compress, an OpenVINO error, memory) is passed over with a
        warning: `auto` never fails a start for want of int8.
        """
        floating = self._candidate("float", plan.hint)
        try:
            self._graphs["int8-dynamic"] = self._load_ir("int8-dynamic")
        except Exception as exc:  # noqa: BLE001 - NNCF and OpenVINO raise whatever their internals raise
            log.warning("OpenVINO: int8-dynamic could not be made (%s: %s); serving the float pick", exc.__class__.__name__, exc)
            return replace(plan, reason=f"{plan.reason}; int8-dynamic not tried: compression failed "
                                        f"({exc.__class__.__name__}: {exc})")
        pairs = calibration_pairs()
        encoded = self.encode(pairs)
        groups = {f"int8-dynamic/{group}": group for group in DYNAMIC_GROUPS}  # candidate -> group size
        failures: dict[str, str] = {}
        batched: dict[str, list[float]] = {}
        variation: dict[str, float] = {}

        def score_in(name: str) -> list[float]:
            try:
                compiled = self._candidate("float", "f32") if name == "fp32" else \
                    self._candidate("int8-dynamic", "f32", groups[name])
                batched[name] = self._score(encoded, compiled)
            except Exception as exc:  # noqa: BLE001 - a compile error or OOM passes the candidate over
                log.warning("OpenVINO: %s failed (%s: %s); trying the next", name, exc.__class__.__name__, exc)
                if name == "fp32":
                    raise
                failures[name] = f"{exc.__class__.__name__}: {exc}"
                return [math.nan] * len(encoded)
            return batched[name]

        def invariant(name: str) -> bool:
            compiled = self._candidates[("int8-dynamic", "f32", groups[name])]
            variation[name] = self.batch_variation(encoded, batched[name], compiled)
            return variation[name] <= INVARIANCE_TOLERANCE

        choice = calibration.choose(score_in, candidates=list(groups), floor=SPEARMAN_FLOOR, check=invariant)
        measured = ", ".join(f"group {groups[name]} " + ("failed" if name in failures else f"{rho:.4f}")
                             for name, rho in choice.measured.items())
        gate = f"Spearman vs fp32 on {len(pairs)} calibration pairs {measured} (floor {SPEARMAN_FLOOR})"
        if variation:
            gate += "; batch-mates move scores by " + ", ".join(
                f"{value:.1e} (group {groups[name]})" for name, value in variation.items()) + \
                f" (tolerance {INVARIANCE_TOLERANCE:.0e})"
        dtype = "bf16" if plan.hint == "bf16" else "fp32"
        plan = replace(plan, spearman={str(groups[name]): rho for name, rho in choice.measured.items()})
        if choice.dtype == "fp32":
            return replace(plan, reason=f"{plan.reason}; int8-dynamic not kept: {gate}")
        group = groups[choice.dtype]
        try:
            seconds = self._time({"dynamic": self._candidates[("int8-dynamic", "f32", group)], "float": floating})
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("OpenVINO: timing int8-dynamic failed (%s: %s); serving the float pick", exc.__class__.__name__, exc)
            return replace(plan, reason=f"{plan.reason}; int8-dynamic not kept: timing it failed ({exc})")
        ratio = seconds["float"] / seconds["dynamic"]
        if ratio <= 1.0:
            return replace(plan, reason=f"{plan.reason}; int8-dynamic kept the ranking ({gate}) but ran "
                                        f"{ratio:.2f}x {dtype}'s speed")
        picked = (f"auto: int8-dynamic {_dynamic(group)}: {gate}; measured at start, {ratio:.2f}x {dtype}'s speed "
                  f"(the float pick: {plan.reason.removeprefix('auto: ')})")
        log.info("OpenVINO: %s", picked)
        return Plan("int8-dynamic", "f32", group, picked, plan.spearman, speedup=round(ratio, 3))

    # --- conversion, cached on disk by fingerprint -------------------------------------------
    def ir_fingerprint(self, graph: str) -> str:
        """Names the converted graph: the model, the graph's precision and the OpenVINO tools that shaped
        it (not torch or transformers: a server without them must find what a server with them made)."""
        fields: dict[str, object] = {"model": self.files.name, "revision": self.files.revision, "kind": self.files.kind,
                                     "max_length": self.max_length, "graph": graph, "openvino": ov.get_version()}
        if graph != "float":
            fields["nncf"] = _nncf_version()
        if graph == "int8":
            fields["calibration"] = hashlib.sha256(SAMPLE_TEXT.read_bytes()).hexdigest()[:12]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def _ir_folder(self, graph: str) -> Path:
        return self.cache_dir / f"{self.files.name.replace('/', '--').strip('.-')[-60:]}-{graph}-{self.ir_fingerprint(graph)}"

    def _ir_folder_name(self, graph: str) -> str:
        return self._ir_folder(graph).name

    def find_ir(self, graph: str) -> Path | None:
        """The converted graph's model.xml: in the seed dirs (in order), then the cache dir; None if nowhere."""
        name = self._ir_folder_name(graph)
        for folder in [*self.seed_dirs, self.cache_dir]:
            if (folder / name / "model.xml").is_file():
                return folder / name / "model.xml"
        return None

    def _load_ir(self, graph: str) -> Any:
        folder = self._ir_folder(graph)
        xml = self.find_ir(graph)
        if xml is not None:
            log.info("OpenVINO: loading the converted model from %s", xml.parent)
            started = time.perf_counter()
            try:
                return self.core.read_model(xml)
            finally:
                self.startup["compile"] += time.perf_counter() - started
        log.info("OpenVINO: converting %s (%s); cached in %s", self.files.name, graph, folder)
        started = time.perf_counter()
        try:
            model = self._convert(graph)
        finally:
            self.startup["convert"] += time.perf_counter() - started
        if self._writable(self.cache_dir):
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.cache_dir))
            try:
                ov.save_model(model, staging / "model.xml", compress_to_fp16=False)  # keep fp32 weights exact
                os.replace(staging, folder)  # atomic: a concurrent start sees all of it or none
            except OSError as exc:  # another process won the race, or the disk is full: serve from memory
                log.warning("OpenVINO: could not cache the converted model in %s (%s)", folder, exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            log.warning("OpenVINO: %s is not writable: the model is converted again at every start "
                        "(set RERANKER_MODEL_CACHE_DIR to a writable folder)", self.cache_dir)
        return model

    @staticmethod
    def _writable(folder: Path) -> bool:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(folder, os.W_OK)

    def _convert(self, graph: str) -> Any:
        if graph == "int8-dynamic":  # the float graph's weights to int8; activations are quantized at run time
            return self._nncf().compress_weights(self._load_ir("float"), mode=self._nncf().CompressWeightsMode.INT8_ASYM)
        try:
            import torch
            from transformers import AutoModel, AutoModelForSequenceClassification
        except ImportError as exc:  # the slim image: the IR must come from `reranker convert`
            places = ", ".join(str(folder) for folder in [*self.seed_dirs, self.cache_dir])
            raise ConversionNeeded(
                f"{self.files.name} has no converted OpenVINO graph ({self._ir_folder_name(graph)}) in {places}, and "
                f"this server cannot convert it: PyTorch and transformers are not installed ({exc}). Run `reranker "
                "convert` with the same settings (the -torch image, or the operator's spec.model.cache Job) into "
                "RERANKER_MODEL_CACHE_DIR or a RERANKER_MODEL_SEED_DIRS folder",
                available=lambda: self.find_ir(graph) is not None) from exc

        path = str(self.files.path)
        if self.files.kind == "cross-encoder":
            torch_model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            labels = int(torch_model.config.num_labels)
            if labels not in (1, 2):
                raise BackendError(f"{self.files.name} has {labels} labels; a reranker needs 1 (relevance logit) or 2 (no/yes)")
        else:
            torch_model = AutoModel.from_pretrained(path, dtype=torch.float32)
        torch_model.eval()
        example = self._example()
        with torch.inference_mode():
            model = ov.convert_model(torch_model, example_input={k: torch.from_numpy(v) for k, v in example.items()})
        if graph == "int8":
            model = self._quantize(model)
        return model

    def _example(self) -> dict[str, np.ndarray]:
        """A small batch of two rows of different lengths: the traced shapes stay dynamic."""
        pairs = [Pair("example query", "a short document"), Pair("another example query", "a somewhat longer document " * 4)]
        if self.files.kind == "cross-encoder":
            return self.collate_cross(self.encode(pairs)).as_dict()
        return self.collate([e.ids for e in self.encode(pairs)]).as_dict()

    def _calibration(self) -> list[dict[str, np.ndarray]]:
        batches = []
        for pairs in sample_pairs(batches=CALIBRATION_BATCHES, size=CALIBRATION_BATCH):
            encoded = self.encode(pairs)
            if self.files.kind == "cross-encoder":
                batches.append(self.collate_cross(encoded).as_dict())
            else:
                batches.append(self.collate([encoded[0].query or []] + [e.ids for e in encoded]).as_dict())
        return batches

    @staticmethod
    def _nncf() -> Any:
        try:
            import nncf
        except ImportError as exc:  # pragma: no cover - the `server` extra brings it
            raise BackendError("int8 with OpenVINO needs nncf: pip install 'reranker-fleet[server]'") from exc
        return nncf

    def _quantize(self, model: Any) -> Any:
        nncf = self._nncf()
        batches = self._calibration()
        return nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(batches))

    @staticmethod
    def _pick_output(compiled: Any) -> Any:
        """Cross-encoders: the logits (the only output). Bi-encoders: last_hidden_state, not the pooler."""
        for output in compiled.outputs:
            if "last_hidden_state" in output.get_names():
                return output
        return compiled.outputs[0]

    # --- scoring -------------------------------------------------------------------------------
    def collate(self, rows: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None] | None = None) -> Features:
        """Padded as every runtime pads, then to a width that is a multiple of `width_multiple`
        (capped at max_length): a pair's score then depends on the pair alone, not on how long its
        batch-mates are (WIDTH_MULTIPLE). The extra positions are masked like any padding."""
        features = super().collate(rows, types)
        width = features.input_ids.shape[1]
        target = max(width, min(-(-width // self.width_multiple) * self.width_multiple, self.max_length))
        if target == width:
            return features
        extra = ((0, 0), (0, target - width))
        return Features(
            input_ids=np.pad(features.input_ids, extra, constant_values=self.pad_token_id),
            attention_mask=np.pad(features.attention_mask, extra),
            token_type_ids=None if features.token_type_ids is None else np.pad(features.token_type_ids, extra),
        )

    def _infer(self, features: Features, compiled: Any = None) -> np.ndarray:
        """The output for one batch: on the serving model (this thread's infer request) or on `compiled`."""
        if compiled is not None:
            request, output = compiled.create_infer_request(), self._pick_output(compiled)
        else:
            request, output, compiled = getattr(self._requests, "request", None), self._output, self.compiled
            if request is None:
                request = self._requests.request = compiled.create_infer_request()
        result = request.infer(self._inputs(compiled, features.as_dict()))
        return np.array(result[output], dtype=np.float32)  # a copy: the request reuses its buffers

    @staticmethod
    def _inputs(compiled: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays the graph takes (tracing drops inputs a model ignores)."""
        names = {name for port in compiled.inputs for name in port.get_names()}
        return {name: array for name, array in arrays.items() if name in names}

    def score_encoded(self, batch: Sequence[Encoded]) -> list[float]:
        return self._score(batch)

    def _score(self, batch: Sequence[Encoded], compiled: Any = None) -> list[float]:
        """Raw scores on the serving model, or on `compiled` (auto's measurements), in batches of 32."""
        if not batch:
            return []
        if len(batch) > 32 and compiled is not None:
            return [s for i in range(0, len(batch), 32) for s in self._score(batch[i:i + 32], compiled)]
        if self.files.kind == "cross-encoder":
            logits = self._infer(self.collate_cross(batch), compiled)
            # softmax(l)[1] == sigmoid(l1 - l0): keep the log-odds as the raw score.
            raw = logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits[:, 0]
            return raw.astype(np.float64).tolist()  # type: ignore[no-any-return]
        return self._score_bi(self.collate_bi(batch), compiled)

    def _score_bi(self, batch: BiBatch, compiled: Any = None) -> list[float]:
        hidden = self._infer(batch.features, compiled)
        mask = batch.features.attention_mask[:, :, None].astype(np.float32)
        pooling = self.files.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = np.where(mask == 0, np.float32(-1e9), hidden).max(axis=1)
        elif pooling == "lasttoken":
            pooled = hidden[np.arange(hidden.shape[0]), batch.features.attention_mask.sum(axis=1) - 1]
        else:
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        emb = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (emb[batch.queries] * emb[batch.documents]).sum(axis=1).astype(np.float64).tolist()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.compiled = None


def _nncf_version() -> str:
    """nncf's version without importing it (an import pulls in torch wherever torch is installed)."""
    try:
        return version("nncf")
    except PackageNotFoundError:
        return "none"

