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
  fingerprint of the model (name, revision, kind), the precision of the graph, and the versions
  of openvino, nncf, torch and transformers that made it: a restart loads the IR and converts
  nothing, and an upgrade of any of them converts again. OpenVINO's own compiled-blob cache sits
  next to it (CACHE_DIR), so the second start also skips kernel compilation.

Precision is a compile-time hint: fp32 sets INFERENCE_PRECISION_HINT=f32 (OpenVINO would
otherwise run bf16 on a bf16-capable CPU), bf16 sets bf16; int8 runs its quantized layers in int8
and the rest in fp32, or in bf16 where the CPU has native bf16 and bf16 measures faster at start
(like `auto`'s fp32/bf16 race: on an AVX512-BF16 CPU without AMX neither won every time, from
2x apart to even, so it is measured where it runs). `info.dtype` reports what the
compiled model really uses. Tokenization is the model's Hugging Face tokenizer (tokenization.py),
identical to the other runtimes; infer requests are per thread (one per forward worker, one
worker per stream). Thread pools are sized for the CPUs the process may use (cpus.py: a pod's
CPU limit, not the node's cores).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import cpus
from .base import Backend, BackendError, BackendInfo, DeviceUnavailable, Encoded, EngineSizing, Pair
from .model_files import ModelFiles
from .precision import SAMPLE_TEXT, cpu_flags, native_bf16, race, raced, resolve, sample_pairs
from .tokenization import BiBatch, Features, HFTokenization

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

log = logging.getLogger(__name__)

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - the `server` extra brings it
    raise DeviceUnavailable("the OpenVINO runtime is not installed: pip install 'reranker-fleet[server]' "
                            "(or RERANKER_RUNTIME=torch)") from exc

CALIBRATION_BATCHES, CALIBRATION_BATCH = 12, 8
#: int8-dynamic: int8 weights (asymmetric, per output channel) and activations quantized to int8 at
#: run time in groups of this many values (OpenVINO's dynamic quantization). Smaller groups follow
#: the activations closer and run slower; RERANKER_QUANTIZATION=int8-dynamic uses the middle one,
#: `auto` tries them fastest first and keeps the first that holds the ranking (docs/openvino.md).
DYNAMIC_GROUPS = (128, 64, 32)
DYNAMIC_GROUP = 64
Graph = Literal["float", "int8", "int8-dynamic"]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/reranker-fleet (default ~/.cache/reranker-fleet)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reranker-fleet"


class OpenVINOBackend(HFTokenization, Backend):
    """A Hugging Face model converted to OpenVINO IR, compiled for this CPU."""

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
        self._init_tokenizer(files)
        picked = resolve(settings.quantization, device="cpu")
        graph: Graph = picked.quantization if picked.quantization in ("int8", "int8-dynamic") else "float"  # type: ignore[assignment]
        self.cache_dir = (settings.model_cache_dir or default_cache_dir()) / "openvino"
        self.core = ov.Core()
        model = self._load_ir(graph)
        # bf16 for bf16 and for int8's float layers, where the CPU computes bf16 natively.
        hint = "bf16" if picked.quantization == "bf16" or (graph == "int8" and native_bf16()) else "f32"
        reason = picked.reason
        if hint == "bf16" and (settings.quantization == "auto" or graph == "int8"):
            # Native bf16 is not always faster (e.g. AVX512-BF16 without AMX, small models): both keep the
            # ranking (Spearman >= 0.999), so measure both on this CPU and keep the faster; for int8 the
            # race is between its float layers in bf16 and in fp32.
            hint, raced_reason = self._race(model)
            reason = raced_reason if graph == "float" else \
                f"{picked.reason}; its float layers: {raced_reason.removeprefix('auto: ')}"
        self._use(self._compile(model, hint, group=DYNAMIC_GROUP if graph == "int8-dynamic" else None))
        runs = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16" or "f32"
        dtype: str = graph if graph != "float" else ("bf16" if runs == "bf16" else "fp32")
        if graph == "int8-dynamic":
            reason += f" (int8 weights, activations quantized at run time in groups of {DYNAMIC_GROUP})"
        if settings.quantization == "auto":
            dtype, reason = self._try_dynamic(model if hint == "f32" else None, dtype, reason)
        activation: Literal["sigmoid", "identity"] = "sigmoid" if files.kind == "cross-encoder" else "identity"
        if settings.quantization == "bf16" and dtype != "bf16":
            reason += f"; this CPU has no native bf16: OpenVINO runs {runs}"
        self.info = BackendInfo(
            model=files.name, revision=files.revision, kind=files.kind, backend="openvino", device="cpu",
            dtype=dtype, max_length=self.max_length, activation=activation, precision=reason,
        )

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
        return self.core.compile_model(model, "CPU", config)

    def sizing(self) -> EngineSizing:
        """One forward in flight per stream, the work spread across them (EngineSizing.spread)."""
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        return EngineSizing(max_parallel=max(1, streams), spread=True)

    def _race(self, model: Any) -> tuple[str, str]:
        """`auto` on a CPU with native bf16: bf16 against fp32 on the same probe batches; the faster stays."""
        picked = raced(self._time({"bf16": self._compile(model, "bf16"), "none": self._compile(model, "f32")}))
        log.info("OpenVINO: %s", picked.reason)
        return ("bf16" if picked.quantization == "bf16" else "f32"), picked.reason

    def _time(self, compiled: dict[str, Any]) -> dict[str, float]:
        """Seconds each compiled model takes on the same probe batches (interleaved: `race`)."""
        probe = self._calibration()[:2]

        def run(candidate: Any) -> None:
            request = candidate.create_infer_request()
            for batch in probe:
                request.infer(self._inputs(candidate, batch))

        return race({name: functools.partial(run, c) for name, c in compiled.items()})

    def _try_dynamic(self, fp32: Any | None, dtype: str, reason: str) -> tuple[str, str]:
        """`auto`: int8-dynamic where it keeps the ranking and runs faster than the float pick.

        How much int8 moves scores depends on the model, so it is measured on it, as on CUDA
        (calibration.py): the calibration pairs scored in fp32 and with each group size, largest
        (fastest) first; the first with Spearman >= 0.999 vs fp32 is timed against the float pick
        on probe batches, and serves if faster. `fp32`: the float graph when the pick runs fp32.
        The Spearman figures are kept next to the compressed graph, so a restart on the same CPU
        only times the pick (the scores do not change; the speed may).
        """
        from .calibration import SPEARMAN_FLOOR, Choice, calibration_pairs, choose

        floating = self.compiled
        weights = self._load_ir("int8-dynamic")
        pairs = calibration_pairs()
        groups = {f"int8-dynamic/{group}": group for group in DYNAMIC_GROUPS}  # candidate -> group size
        candidates = list(groups)
        compiled: dict[str, Any] = {}

        def compile_(name: str) -> Any:
            compiled[name] = self._compile(weights, "f32", group=groups[name])
            return compiled[name]

        record = self._ir_folder("int8-dynamic") / f"ranking-{self._gate_key(len(pairs))}.json"
        try:  # measured at an earlier start on this CPU: the same numbers again
            earlier: dict[str, float] = json.loads(record.read_text())
            picked = next((name for name in candidates if earlier.get(name, -1.0) >= SPEARMAN_FLOOR), "fp32")
            choice = Choice(picked, earlier)
            if picked != "fp32":
                compile_(picked)
        except (OSError, ValueError):
            reference = floating if fp32 is not None else self._compile(self._load_ir("float"), "f32")
            encoded = self.encode(pairs)  # tokenized only when the ranking is measured

            def score_in(name: str) -> list[float]:
                return self._score(encoded, reference if name == "fp32" else compile_(name))

            choice = choose(score_in, candidates=candidates)
            if self._writable(record.parent):
                record.write_text(json.dumps(choice.measured))
        measured = ", ".join(f"group {groups[name]} {rho:.4f}" for name, rho in choice.measured.items())
        gate = f"Spearman vs fp32 on {len(pairs)} calibration pairs {measured} (floor 0.999)"
        if choice.dtype == "fp32":
            return dtype, f"{reason}; int8-dynamic not kept: {gate}"
        seconds = self._time({"dynamic": compiled[choice.dtype], "float": floating})
        ratio = seconds["float"] / seconds["dynamic"]
        if ratio <= 1.0:
            return dtype, f"{reason}; int8-dynamic kept the ranking ({gate}) but ran {ratio:.2f}x {dtype}'s speed"
        self._use(compiled[choice.dtype])
        picked = (f"auto: int8-dynamic (int8 weights, activations quantized at run time in groups of {groups[choice.dtype]}): "
                  f"{gate}; measured at start, {ratio:.2f}x {dtype}'s speed (the float pick: {reason.removeprefix('auto: ')})")
        log.info("OpenVINO: %s", picked)
        return "int8-dynamic", picked

    # --- conversion, cached on disk by fingerprint -------------------------------------------
    def ir_fingerprint(self, graph: str) -> str:
        """Names the converted graph: the model, the graph's precision and every tool that shaped it."""
        fields = {"model": self.files.name, "revision": self.files.revision, "kind": self.files.kind, "graph": graph,
                  "openvino": ov.get_version(), "torch": version("torch"), "transformers": version("transformers")}
        if graph != "float":
            fields["nncf"] = version("nncf")
        if graph == "int8":
            fields["calibration"] = hashlib.sha256(SAMPLE_TEXT.read_bytes()).hexdigest()[:12]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def _ir_folder(self, graph: str) -> Path:
        return self.cache_dir / f"{self.files.name.replace('/', '--').strip('.-')[-60:]}-{graph}-{self.ir_fingerprint(graph)}"

    @staticmethod
    def _gate_key(pairs: int) -> str:
        """What a ranking measurement depends on beyond the graph: the CPU's instructions (the int8
        kernels differ between VNNI and AMX), the pairs and the groups tried."""
        material = json.dumps({"cpu": sorted(cpu_flags()), "pairs": pairs, "groups": DYNAMIC_GROUPS})
        return hashlib.sha256(material.encode()).hexdigest()[:12]

    def _load_ir(self, graph: str) -> Any:
        folder = self._ir_folder(graph)
        xml = folder / "model.xml"
        if xml.is_file():
            log.info("OpenVINO: loading the converted model from %s", folder)
            return self.core.read_model(xml)
        log.info("OpenVINO: converting %s (%s); cached in %s", self.files.name, graph, folder)
        model = self._convert(graph)
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
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification

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
