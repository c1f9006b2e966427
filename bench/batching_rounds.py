"""The batching policy alone, without the machine's noise: rounds (`cut_round`) against first-come.

    .venv/bin/python bench/batching_rounds.py

A closed loop like bench/peer_infinity.py's (C clients, 4 requests each, back to back) is run
through the server's own cut functions against a model of the forward: a batch costs its padded
tokens (longest pair x pairs) at one stream per worker, 2 workers side by side (OpenVINO's
streams on 2 cores), plus 10 ms. Requests of 20 pairs of 108-158 tokens (the peer bench's), and
of 5-40 pairs (mixed sizes). Each row is the mean of 12 seeds. Prints pairs/s and p50/p99 in
model seconds for both policies, and the ratios rounds / first-come. On a real server the same
comparison is noisy (bench/peer_infinity.py); here it is exact, so a change to the policy shows.
"""

from __future__ import annotations

import heapq
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from reranker.batcher import SPREAD_MIN, Job, cut_batch, cut_round  # noqa: E402

BATCH, WORKERS, MAX_TOKENS, SEEDS = 32, 2, 16384, 12
Cutter = Callable[[Sequence[Job], int], list[list[Job]]]


def first_come(jobs: Sequence[Job], idle: int) -> list[list[Job]]:
    """The batcher's first-come cut, split across idle workers as `spread` does."""
    workers = min(idle, len(jobs) // SPREAD_MIN)
    share = BATCH if workers <= 1 else min(BATCH, -(-len(jobs) // workers))
    return [cut_batch(jobs, batch_size=share, max_tokens=MAX_TOKENS)]


def rounds(jobs: Sequence[Job], idle: int) -> list[list[Job]]:
    return cut_round(jobs, batch_size=BATCH, max_tokens=MAX_TOKENS, workers=WORKERS, spread=True)


class Request:
    def __init__(self, sent: float, pairs: int) -> None:
        self.sent, self.left = sent, pairs


def closed_loop(cut: Cutter, *, clients: int, sizes: Callable[[random.Random], int], seed: int) -> tuple[float, list[float]]:
    """(pairs/s, latencies) of `clients` clients sending 4 requests each, one at a time."""
    rng = random.Random(seed)
    todo = [[rng.randint(100, 150) + 8 for _ in range(sizes(rng))] for _ in range(4 * clients)]
    pending: list[Job] = []
    latencies: list[float] = []
    ready: list[list[Job]] = []
    running: list[tuple[float, int, list[Job]]] = []
    now, idle, scored = 0.0, WORKERS, 0

    def send(at: float) -> None:
        if todo:
            tokens = todo.pop(0)
            origin = Request(at, len(tokens))
            pending.extend(Job(pair=("q", "d"), key="", tokens=t, future=None, origin=origin)  # type: ignore[arg-type]
                           for t in tokens)

    for _ in range(clients):
        send(0.0)
    while pending or running:
        while idle and pending:
            if not ready:
                ready = cut(pending, idle)
            batch = ready.pop(0)
            taken = set(map(id, batch))
            pending[:] = [j for j in pending if id(j) not in taken]
            cost = 0.01 + max(j.tokens for j in batch) * len(batch) * WORKERS / (30 * 140)
            heapq.heappush(running, (now + cost, id(batch), batch))
            idle -= 1
        now, _, batch = heapq.heappop(running)
        idle += 1
        for job in batch:
            scored += 1
            job.origin.left -= 1  # type: ignore[union-attr]
            if job.origin.left == 0:  # type: ignore[union-attr]
                latencies.append(now - job.origin.sent)  # type: ignore[union-attr]
                send(now)
    return scored / now, sorted(latencies)


def main() -> None:
    workloads = {"20-pair requests": lambda rng: 20, "5-40-pair requests": lambda rng: rng.randint(5, 40)}
    print(f"{'workload':20s} {'clients':>7s} {'policy':10s} {'pairs/s':>8s} {'p50 s':>7s} {'p99 s':>7s}")
    for name, sizes in workloads.items():
        for clients in (1, 4, 8, 16):
            means = {}
            for policy, cut in (("first-come", first_come), ("rounds", rounds)):
                runs = [closed_loop(cut, clients=clients, sizes=sizes, seed=s) for s in range(SEEDS)]
                rate = statistics.mean(r for r, _ in runs)
                p50 = statistics.mean(statistics.median(lat) for _, lat in runs)
                p99 = statistics.mean(lat[min(len(lat) - 1, int(0.99 * len(lat)))] for _, lat in runs)
                means[policy] = (rate, p50, p99)
                print(f"{name:20s} {clients:7d} {policy:10s} {rate:8.1f} {p50:7.2f} {p99:7.2f}")
            (r0, _, q0), (r1, _, q1) = means["first-come"], means["rounds"]
            print(f"{'':20s} {'':7s} {'ratio':10s} {r1 / r0:7.2f}x {'':7s} {q1 / q0:6.2f}x  (rounds / first-come)")


if __name__ == "__main__":
    main()
