"""OpenVINO on a CPU: one stream on every core (LATENCY) against one stream per core (THROUGHPUT).

    .venv/bin/python bench/openvino_streams.py [--model FOLDER] [--quantization none|bf16|int8]

The same compiled IR the server loads, the same batches (128 pairs of ~145 tokens, batch 32):
LATENCY runs them one after the other on one infer request that uses every core; THROUGHPUT runs
them on one infer request per stream, one thread each, side by side (what the server's forward
workers do). Interleaved rounds, so background load falls on both alike. Prints pairs/s and the
ratio THROUGHPUT / LATENCY.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).parent))
import workload as w  # noqa: E402

from reranker.backends import load_backend  # noqa: E402
from reranker.backends.precision import race  # noqa: E402
from reranker.settings import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved cross-encoder folder (default: build workload.py's)")
    parser.add_argument("--quantization", default="none", choices=["none", "bf16", "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or w.build_cross_encoder()
    backend = load_backend(Settings(runtime="openvino", device="cpu", quantization=args.quantization, model=str(model),
                                    model_cache_dir=Path(tempfile.mkdtemp(prefix="bench-ov-")), warmup_on_start=False))
    pairs = [("what is search ranking", t) for t in w.texts(128, tokens=(100, 150), seed=0)]
    encoded = backend.encode(pairs)
    feeds = [backend._inputs(backend.compiled, backend.collate_cross(encoded[i:i + 32]).as_dict())
             for i in range(0, len(encoded), 32)]
    hint = backend.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    graph = backend._load_ir("int8" if args.quantization == "int8" else "float")
    latency = backend.core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    throughput = backend.core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT"})
    streams = int(throughput.get_property("NUM_STREAMS"))
    one = latency.create_infer_request()
    per_stream = [throughput.create_infer_request() for _ in range(streams)]

    def run_latency() -> None:
        for feed in feeds:
            one.infer(feed)

    def run_throughput() -> None:
        def worker(k: int) -> None:
            for feed in feeds[k::streams]:
                per_stream[k].infer(feed)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    seconds = race({"latency": run_latency, "throughput": run_throughput}, rounds=args.rounds)
    print(f"# {backend.info.model}: {hint}, {len(pairs)} pairs in batches of 32; THROUGHPUT: {streams} streams of "
          f"{throughput.get_property('INFERENCE_NUM_THREADS') // max(streams, 1) or 1} thread(s)")
    for name, s in seconds.items():
        print(f"{name:<11} {args.rounds * len(pairs) / s:8.1f} pairs/s")
    print(f"ratio throughput / latency = {seconds['latency'] / seconds['throughput']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
