"""Getting batches onto the GPU and scores off it without stalling either side (CUDA only).

A MiniLM-sized forward takes a few milliseconds on a data-centre GPU, so the host work around it
(building the batch, copying it over, waiting for the scores) decides the throughput unless it
overlaps with the GPU's work. Each batcher worker thread gets its own `Lane`:

- its own CUDA stream, so two threads' batches are in flight at once: while one batch runs, the
  other thread packs and uploads the next (RERANKER_MAX_PARALLEL threads, see runtime sizing);
- one pinned (page-locked) host buffer for the batch's int64 arrays, uploaded with a single
  non-blocking copy, and one pinned buffer the scores come back to, non-blocking too;
- one wait per batch, on an event recorded after the download: the thread sleeps without the
  GIL while the GPU works, and no request ever forces a device-wide synchronize.

A buffer is reused only by the thread that owns it, after that thread's previous batch finished,
so a copy still in flight is never overwritten.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch


class Lane:
    """One worker thread's stream and pinned buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.done = torch.cuda.Event()
        self._up = torch.empty(0, dtype=torch.int64, pin_memory=True)
        self._down = torch.empty(0, dtype=torch.float32, pin_memory=True)

    @staticmethod
    def _grown(buffer: torch.Tensor, size: int) -> torch.Tensor:
        if buffer.numel() >= size:
            return buffer
        return torch.empty(max(size, 2 * buffer.numel()), dtype=buffer.dtype, pin_memory=True)

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Copy int64 host arrays to the device in one non-blocking transfer; device views, in order."""
        total = sum(len(a) for a in arrays)
        self._up = self._grown(self._up, total)
        host = self._up[:total]
        np.concatenate(arrays, out=host.numpy())
        flat = host.to(self.device, non_blocking=True)
        views, start = [], 0
        for a in arrays:
            views.append(flat[start:start + len(a)])
            start += len(a)
        return views

    def download(self, scores: torch.Tensor) -> list[float]:
        """Bring a 1-D score tensor back as Python floats: one non-blocking copy, one wait."""
        n = scores.numel()
        self._down = self._grown(self._down, n)
        host = self._down[:n]
        host.copy_(scores, non_blocking=True)
        self.done.record(self.stream)
        self.done.synchronize()
        return host.tolist()  # type: ignore[no-any-return]


class Lanes:
    """A `Lane` per calling thread, made on first use."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._local = threading.local()

    def get(self) -> Lane:
        lane: Lane | None = getattr(self._local, "lane", None)
        if lane is None:
            lane = self._local.lane = Lane(self.device)
        return lane
