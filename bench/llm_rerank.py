"""LLM reranker throughput: shared-prefix vs full-prompt scoring, and the server vs in-process.

Workload (issue 14): 20-document requests, a ~60-token instruction + query, ~150-token documents,
Qwen3-Reranker's prompt, on a random-weight Qwen3 causal LM of Qwen3-0.6B's shape: scaled down
to run on a small CPU (`--shape small`, the default), or at full size (`--shape qwen3-0.6b`, for
a GPU). The tokenizer is a byte-level BPE trained here on the benchmark's words (plus the chat
special tokens), so nothing is downloaded and no package beyond torch/transformers/tokenizers is
needed; token counts are measured and printed.

Sections (each a ratio against a baseline measured in the same run):
  1. in-process, full prompt per pair (RERANKER_PREFIX_SHARING=false): pairs/s
  2. in-process, shared prefix: pairs/s and the speed-up over 1 (target >= 1.3x); 1 and 2 are
     measured interleaved, request by request, so a busy machine slows both alike
  3. with --server: `reranker serve` over HTTP, concurrent clients, shared prefix: pairs/s over
     the in-process shared-prefix rate, the two alternating (target >= 0.95)
The in-process part uses the backend directly (no FastAPI, pydantic-settings...), so it runs on a
machine with only torch and transformers; the server part needs the `server` extra.

    python bench/llm_rerank.py                      # CPU, scaled-down shape, in-process only
    python bench/llm_rerank.py --server             # plus the server section
    python bench/llm_rerank.py --device cuda --dtype bf16 --shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-0.6B (Qwen3-Reranker-0.6B's base): the real dimensions.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151669, tie_word_embeddings=True),
    # The same proportions at half width and 6 layers: minutes, not hours, on two CPU cores.
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=151669, tie_word_embeddings=True),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ("search engine ranking document query relevance model vector index cluster token batch latency "
         "throughput kubernetes operator redis cache python river mountain history science music city "
         "market energy health policy language network storage protein climate travel finance court").split()
DOCS_PER_REQUEST = 20
QUERY_WORDS = 14  # with a ~45-token instruction: the ~60-token instruction + query of the issue
DOC_WORDS = 150
INSTRUCTION = ("Given a web search query about infrastructure, science or policy, retrieve the relevant passages "
               "that answer the query directly and completely, preferring specific documents over general ones")


def build_model(folder: Path, shape: str, dtype: str, init_device: str = "cpu") -> Path:
    """A random Qwen3ForCausalLM of the shape, and a BPE tokenizer with the chat tokens, saved to folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 20 + [INSTRUCTION, "yes no Yes No 0 1 Judge whether the Document meets the requirements "
                                        "based on the Query and the Instruct provided. Note that the answer can only be"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, rope_theta=1_000_000.0,
                         pad_token_id=tokenizer.pad_token_id)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.device(init_device):  # random init of 0.6B parameters: seconds on a GPU, a minute on a CPU
        model = Qwen3ForCausalLM(config).to(torch_dtype).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def requests(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        query = f"q{seed}-{i} " + " ".join(rng.choice(WORDS) for _ in range(QUERY_WORDS))
        docs = [f"d{i}-{j} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(DOC_WORDS - 15, DOC_WORDS + 15)))
                for j in range(DOCS_PER_REQUEST)]
        out.append((query, docs))
    return out


def load(folder: Path, *, device: str, dtype: str, share: bool, max_length: int) -> Any:
    from reranker.backends import model_files
    from reranker.backends.torch_llm import TorchLLMBackend

    files = model_files.describe(folder, name="bench/qwen3-reranker-shaped", revision="bench", kind="llm",
                                 max_length=max_length)
    # The backend reads these settings; a namespace keeps the server stack (pydantic-settings) out.
    settings = types.SimpleNamespace(device=device, quantization={"fp32": "none"}.get(dtype, dtype), max_length=max_length,
                                     prefix_sharing=share, prompt_template="qwen3-reranker", enable_torch_compile=False)
    return TorchLLMBackend(files, settings)  # type: ignore[arg-type]


def batches_of(backend: Any, reqs: list[tuple[str, list[str]]]) -> list[Any]:
    """One batch per request (its 20 documents), tokenized once, as the server's batches hold them."""
    from reranker.backends import Pair

    instruction = backend.instruction(INSTRUCTION)
    return [backend.encode([Pair(q, d, instruction) for d in docs]) for q, docs in reqs]


def timed(backend: Any, batch: Any) -> float:
    t0 = time.perf_counter()
    backend.score_encoded(batch)
    sync(backend)
    return time.perf_counter() - t0


def compare(backend: Any, reqs: list[tuple[str, list[str]]]) -> tuple[float, float]:
    """Pairs/s of the full-prompt and the shared-prefix path, interleaved request by request
    (ABBA), so the drift of a shared machine weighs on both alike."""
    batches = batches_of(backend, reqs)
    for share in (False, True):  # kernels per shape: the first forwards are slow
        backend.share_prefix = share
        timed(backend, batches[0])
    seconds = {False: 0.0, True: 0.0}
    for i, batch in enumerate(batches):
        for share in ((False, True) if i % 2 == 0 else (True, False)):
            backend.share_prefix = share
            seconds[share] += timed(backend, batch)
    backend.share_prefix = True
    pairs = sum(len(b) for b in batches)
    return pairs / seconds[False], pairs / seconds[True]


def sync(backend: Any) -> None:
    if backend.device == "cuda":
        import torch

        torch.cuda.synchronize()


def row(name: str, value: str) -> None:
    print(f"{name:<64} {value}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=None, help="20-doc requests per measurement "
                        "(default: 6 on cpu, 60 on a GPU)")
    parser.add_argument("--server", action="store_true", help="also measure `reranker serve` over HTTP")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in the server section")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads, here and in the "
                        "server (default: torch's). On a machine shared by more busy processes than cores, 1 "
                        "avoids OpenMP threads spinning at barriers while their peers are descheduled.")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    n = args.requests or (6 if args.device == "cpu" else 60)

    started = time.perf_counter()
    folder = build_model(Path(tempfile.mkdtemp(prefix="bench-llm-")), args.shape, args.dtype,
                         init_device="cuda" if args.device == "cuda" else "cpu")
    backend = load(folder, device=args.device, dtype=args.dtype, share=True, max_length=args.max_length)
    reqs = requests(n, seed=1)
    from reranker.backends import Pair

    sample = backend.encode([Pair(reqs[0][0], d, backend.instruction(INSTRUCTION)) for d in reqs[0][1]])
    fixed = len(backend.encode([Pair(reqs[0][0], "", backend.instruction(INSTRUCTION))])[0].ids)
    iq = len(backend.tokenizer(f"<Instruct>: {INSTRUCTION}\n<Query>: {reqs[0][0]}\n", add_special_tokens=False)["input_ids"])
    import torch

    row("workload", f"{args.shape} {args.dtype} on {args.device} ({torch.get_num_threads()} threads); "
        f"{n} requests x {DOCS_PER_REQUEST} docs; "
        f"prompt {sum(e.tokens for e in sample) / len(sample):.0f} tokens/pair (instruction+query {iq}, "
        f"fixed with an empty document {fixed}); setup {time.perf_counter() - started:.0f}s")

    # One model; only how batches run differs (RERANKER_PREFIX_SHARING).
    base_full, base_shared = compare(backend, reqs)
    speedup = base_shared / base_full
    row("1. in-process, full prompt per pair", f"{base_full:9.1f} pairs/s")
    row("2. in-process, shared prefix", f"{base_shared:9.1f} pairs/s")
    row("2. target: shared / full >= 1.3", f"{speedup:.3f} {'MET' if speedup >= 1.3 else 'MISSED'}")
    print(f"speedup={speedup:.3f}", flush=True)
    if args.server:
        ratio = server_section(folder, args, backend, reqs, base_shared)
        print(f"server_ratio={ratio:.3f}", flush=True)
    return 0


def server_section(folder: Path, args: argparse.Namespace, shared: Any, reqs: list[tuple[str, list[str]]],
                   before: float) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    import workload as w

    env = {"RERANKER_MODEL": str(folder), "RERANKER_MODEL_KIND": "llm", "RERANKER_PROMPT_TEMPLATE": "qwen3-reranker",
           "RERANKER_DEVICE": args.device, "RERANKER_QUANTIZATION": {"fp32": "none"}.get(args.dtype, args.dtype),
           "RERANKER_MAX_LENGTH": str(args.max_length), "ENABLE_PREDICTION_CACHE": "false",
           "RERANKER_BATCH_SIZE": str(DOCS_PER_REQUEST), "RERANKER_MAX_BATCH_TOKENS": "1000000",
           "RERANKER_MAX_QUEUE": "100000", "RERANKER_QUEUE_TIMEOUT": "600", "RERANKER_WORKER_TIMEOUT": "600"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = w.Server(env)
    # Server and in-process runs alternate (ABBA over two rounds), so the drift of a shared
    # machine weighs on both alike; each side's pairs/s is its pairs over its own time.
    rounds = 2
    per_round = max(args.clients, -(-len(reqs) // rounds))
    bodies = [{"query": q, "documents": docs, "instruction": INSTRUCTION} for q, docs in requests(per_round * rounds, seed=7)]
    batches = batches_of(shared, reqs)
    chunk = -(-len(batches) // rounds)
    served = w.LoadResult()
    local_pairs, local_seconds = 0, 0.0
    try:
        asyncio.run(w.load(server.url, bodies[: args.clients], clients=args.clients, max_seconds=600,
                           path="/v2/rerank"))  # warm: kernels per shape
        for r in range(rounds):
            for side in (("server", "local") if r % 2 == 0 else ("local", "server")):
                if side == "server":
                    res = asyncio.run(w.load(server.url, bodies[r * per_round:(r + 1) * per_round], clients=args.clients,
                                             max_seconds=600, path="/v2/rerank"))
                    served.pairs += res.pairs
                    served.seconds += res.seconds
                    served.latencies += res.latencies
                    for status, count in res.statuses.items():
                        served.statuses[status] = served.statuses.get(status, 0) + count
                else:
                    part = batches[r * chunk:(r + 1) * chunk]
                    local_pairs += sum(len(b) for b in part)
                    local_seconds += sum(timed(shared, b) for b in part)
    finally:
        server.stop()
    local = local_pairs / local_seconds
    ratio = served.pairs_per_s / local
    row(f"3. server, {args.clients} clients, shared prefix",
        f"{served.pairs_per_s:9.1f} pairs/s  p50 {served.pct(50):6.0f} ms  p99 {served.pct(99):6.0f} ms  "
        f"statuses {served.statuses}")
    row("3. in-process shared prefix, alternating with the server", f"{local:9.1f} pairs/s (before: {before:.1f})")
    row("3. target: server / in-process >= 0.95", f"{ratio:.3f} {'MET' if ratio >= 0.95 else 'MISSED'}")
    return ratio


if __name__ == "__main__":
    raise SystemExit(main())
