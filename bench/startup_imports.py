"""What a server start spends importing, and a cached start's parts, before and after the slim path.

    .venv/bin/python bench/startup_imports.py [--repeats 7] [--starts 5] [--baseline-rev 820c9cf]

1. Imports, each in a fresh interpreter (`python -c`), `--repeats` times, interleaved so that
   background load falls on all alike; the median of the seconds the imports take in-process:
   - `torch + AutoTokenizer`: `import torch; from transformers import AutoTokenizer`, what the
     OpenVINO path used to import on top of its own modules (the tokenizer, and torch for the GPU check);
   - `serving path (new)`: the server's modules, the OpenVINO backend and `tokenizers`, what a slim
     server imports now;
   - `serving path + torch + AutoTokenizer (old)`: both, what the same server imported before.
   Prints the ratio old / new.
2. A cached start (`--starts` > 0): `reranker serve` of the embedded MiniLM whose IR and precision
   record are already in its cache dir (the state of every pod after the first), from the process's
   spawn to /ready answering 200, median of `--starts`; for this revision and for `--baseline-rev`
   (its server/ extracted with `git archive`, run first once to fill its own cache). This revision's
   /health `startup` parts (median per part) are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from servers import free_port  # noqa: E402

OLD = "import torch\nfrom transformers import AutoTokenizer\n"
NEW = ("import reranker.serve, reranker.app, reranker.backends.openvino, reranker.backends.tokenization\n"
       "import tokenizers\n")
CASES = {"torch + AutoTokenizer": OLD, "serving path (new)": NEW,
         "serving path + torch + AutoTokenizer (old)": NEW + OLD}


def import_seconds(code: str) -> float:
    script = f"import time\nstarted = time.perf_counter()\n{code}print(time.perf_counter() - started)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "server")})
    return float(done.stdout.strip().splitlines()[-1])


def imports(repeats: int) -> dict[str, float]:
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, code in CASES.items():
            seconds[name].append(import_seconds(code))
    return {name: statistics.median(values) for name, values in seconds.items()}


def start(source: Path, cache: Path) -> tuple[float, dict[str, object]]:
    """Spawn `python -m reranker serve` from `source`; seconds to /ready 200 and its /health."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source), "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING",
           "RERANKER_RUNTIME": "auto", "RERANKER_QUANTIZATION": "auto", "RERANKER_MODEL_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "reranker", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server from {source} exited with {proc.returncode}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready = time.perf_counter() - started
        return ready, httpx.get(url + "/health", timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(30)


def starts(source: Path, count: int) -> tuple[list[float], list[dict[str, object]]]:
    cache = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        start(source, cache)  # the first start converts and measures: every later one reads
        runs = [start(source, cache) for _ in range(count)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [r[0] for r in runs], [r[1] for r in runs]


def baseline_source(rev: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{rev}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "server"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "server"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters per import case")
    parser.add_argument("--starts", type=int, default=5, help="cached server starts per revision (0: skip)")
    parser.add_argument("--baseline-rev", default="820c9cf", help="the revision before the slim path")
    args = parser.parse_args()

    medians = imports(args.repeats)
    print(f"imports, median of {args.repeats} fresh interpreters:")
    for name, seconds in medians.items():
        print(f"  {name:<45} {seconds:6.2f} s")
    old, new = medians["serving path + torch + AutoTokenizer (old)"], medians["serving path (new)"]
    print(f"  old / new: {old / new:.1f}x ({old - new:.2f} s saved per start)")
    if args.starts <= 0:
        return 0
    baseline = baseline_source(args.baseline_rev)
    before, _ = starts(baseline, args.starts)
    after, healths = starts(REPO / "server", args.starts)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    print(f"cached start (IR and precision record in the cache), spawn -> /ready 200, median of {args.starts}:")
    print(f"  {args.baseline_rev}: {statistics.median(before):.2f} s   (runs: {', '.join(f'{s:.2f}' for s in before)})")
    print(f"  this revision: {statistics.median(after):.2f} s   (runs: {', '.join(f'{s:.2f}' for s in after)})")
    print(f"  before / after: {statistics.median(before) / statistics.median(after):.2f}x")
    parts = {k: statistics.median(float(h["startup"]["seconds"][k]) for h in healths)  # type: ignore[index]
             for k in healths[0]["startup"]["seconds"]}  # type: ignore[index]
    print("  this revision's /health startup parts (median): " + json.dumps({k: round(v, 2) for k, v in parts.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
