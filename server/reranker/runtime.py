"""Everything one server process owns, built from the settings: the lifespan's state.

Loading the model can take minutes (hub download, torch.compile), so it runs in the
background: /health answers at once ("loading"), /ready and the rerank routes answer 503
until the model is loaded and warm. The batcher, cache and ranker exist only once the
backend does.

A server that cannot convert its model (the slim image: no PyTorch) and finds no converted graph
does not fail: it waits (/health "waiting" with the reason, /ready 503), checks the seed and cache
folders every WAIT_POLL_SECONDS, and loads when `reranker convert` (a Job, another pod) has written
the graph. Crashing would only restart it into the same state, with back-off delaying the load.

/health tells how the start went (`startup`: each phase's seconds, from the process's start) and
how busy the server has been (`activity`: what a scale-to-zero controller needs to see idleness);
the same phases are logged once, in one line, when the server turns ready.

A loaded server can still be unable to serve: every forward slot stuck in a forward past
RERANKER_WORKER_TIMEOUT, or the batching task dead (`fault`). /health and /ready then answer
503 with the reason, so the orchestrator takes the replica out of the Service and restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .admission import Admission
from .auth import ApiKeys
from .backends import Backend, BackendInfo, ConversionNeeded, load_backend
from .batcher import Batcher
from .cache import RemoteTier, ScoreCache
from .leases import Leases
from .metrics import Metrics
from .ranker import Ranker
from .settings import Settings

if TYPE_CHECKING:
    from .registration import Registration

log = logging.getLogger(__name__)

#: How often a waiting server looks for the converted model.
WAIT_POLL_SECONDS = 2.0
#: /health's `startup.seconds`, in the order a start goes through them.
PHASES = ("imports", "model_files", "convert", "compile", "precision", "warm_up")


def process_started_at() -> float:
    """When this process started (unix seconds): its start time in /proc against the uptime (10 ms
    resolution). Elsewhere: when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()

_PENDING_INFO = BackendInfo(model="", revision="", kind="cross-encoder", backend="", device="", dtype="",
                            max_length=0, activation="sigmoid")


class Runtime:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.api_keys = ApiKeys(settings)
        self.model_names = settings.resolved_model_names()
        self.backend: Backend | None = backend
        self.load_error: str | None = None
        self.remote: RemoteTier | None = None
        self.batcher: Batcher | None = None
        self.cache: ScoreCache | None = None
        self.ranker: Ranker | None = None
        # max_parallel may be left to the backend (sized for its device): settled in _build_engine.
        self.admission = Admission(metrics=self.metrics, max_queue=settings.max_queue,
                                   max_parallel=settings.max_parallel or 1, queue_timeout=settings.queue_timeout,
                                   max_concurrent=settings.max_concurrent_requests)
        self.dropped_pairs = 0
        self.waiting: str | None = None  # why the model cannot load yet (no converted graph and no PyTorch)
        self.started_at = process_started_at()
        self.created_at = time.time()
        self.ready_at: float | None = None
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.requests = 0  # rerank requests answered since start
        self.last_request_at: float | None = None
        self.loaded = asyncio.Event()
        self.registration: Registration | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def backend_info(self) -> BackendInfo:
        return self.backend.info if self.backend is not None else _PENDING_INFO

    async def start(self) -> None:
        """Start loading in the background; returns at once."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._load(), name="load-model"))

    def note_request(self) -> None:
        """A rerank request was answered (any status): /health's `activity`."""
        self.requests += 1
        self.last_request_at = time.time()

    async def _wait_for_conversion(self, needed: ConversionNeeded) -> None:
        """Until the converted graph appears (polled every WAIT_POLL_SECONDS): /health says why."""
        self.waiting = str(needed)
        log.warning("waiting for the converted model (checked every %.0f s): %s", WAIT_POLL_SECONDS, needed)
        while True:  # a sleep first: a graph that appeared and still cannot load never spins this loop
            await asyncio.sleep(WAIT_POLL_SECONDS)
            if await asyncio.to_thread(needed.available):
                break
        log.info("the converted model appeared: loading")

    async def _load_backend(self) -> Backend:
        """The backend, after waiting for its conversion as long as that takes."""
        while True:
            try:
                return await asyncio.to_thread(load_backend, self.settings)
            except ConversionNeeded as needed:
                await self._wait_for_conversion(needed)

    async def _load(self) -> None:
        started = time.monotonic()
        # Everything before the app began loading (interpreter, the server's modules, uvicorn) counts as imports.
        self.phases["imports"] = max(0.0, self.created_at - self.started_at)
        try:
            if self.backend is None:
                self.backend = await self._load_backend()
                self.waiting = None
                for phase, seconds in self.backend.startup.items():
                    if phase in self.phases:
                        self.phases[phase] += seconds
            info = self.backend.info
            self.metrics.model_info.labels(model=info.model, backend=info.backend, device=info.device, dtype=info.dtype).set(1)
            if self.settings.redis_enabled and self.settings.enable_prediction_cache:
                self.remote = await self._connect_redis(info.fingerprint)
            self._build_engine(self.backend)
            if self.settings.warmup_on_start:
                warm_started = time.perf_counter()
                rate = await asyncio.to_thread(self.backend.warmup)
                self.phases["warm_up"] = time.perf_counter() - warm_started
                # A first throughput estimate for admission, before any real batch has run.
                assert self.batcher is not None
                self.batcher.seed_throughput(rate)
        except Exception as exc:  # a failed load must show in /health and /ready, not kill the loop silently
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            log.error("model load failed: %s", self.load_error)
            return
        self.admission.ready = True
        self.ready_at = time.time()
        self.loaded.set()
        log.info("serving %s (%s on %s, %s, max_length %d) after %.1fs", info.model, info.backend, info.device,
                 info.dtype, info.max_length, time.monotonic() - started)
        p = self.phases
        log.info("ready in %.1f s: imports %.1f, model files %.1f, convert %.1f, compile %.1f, precision %.1f, "
                 "warm-up %.1f", self.ready_at - self.started_at, p["imports"], p["model_files"], p["convert"],
                 p["compile"], p["precision"], p["warm_up"], extra={"startup": self.startup()})
        if self.settings.register_deployment:
            # Join the fleet's Service from outside the cluster (a Mac): in the background, and
            # nothing it meets can stop the serving.
            from .registration import Registration

            self.registration = Registration(self.settings, info=info,
                                             draining=lambda: self.admission.draining)
            self.registration.start()

    async def _connect_redis(self, fingerprint: str) -> RemoteTier:
        from .redis_tier import RedisTier

        s = self.settings
        tier = RedisTier(s.redis_url, prefix=s.redis_prefix, fingerprint=fingerprint, ttl=s.cache_ttl_seconds,
                         metrics=self.metrics, timeout=s.redis_timeout, lease_seconds=s.redis_lease_seconds)
        await tier.check()
        return tier

    def _build_engine(self, backend: Backend) -> None:
        s = self.settings
        sized = backend.sizing()  # what the device wants, where the settings leave it open
        self.admission.max_parallel = s.max_parallel or sized.max_parallel
        self.batcher = Batcher(
            backend, self.metrics, batch_size=s.batch_size or sized.batch_size,
            max_batch_tokens=s.max_batch_tokens or sized.max_batch_tokens,
            window_ms=s.micro_batch_window_ms if s.micro_batch_enabled else 0.0,
            max_parallel=self.admission.max_parallel, worker_timeout=s.worker_timeout, max_retries=s.max_retries,
            padded=sized.padded, spread=sized.spread,
        )
        self.cache = ScoreCache(fingerprint=backend.info.fingerprint, size=s.cache_size, ttl=s.cache_ttl_seconds,
                                metrics=self.metrics, enabled=s.enable_prediction_cache, remote=self.remote)
        self.admission.batcher = self.batcher
        leases = None
        if self.remote is not None and s.enable_prediction_cache:
            leases = Leases(self.remote, lease_seconds=s.redis_lease_seconds, metrics=self.metrics)
            self._tasks.append(asyncio.get_running_loop().create_task(leases.renew_forever(), name="renew-leases"))
        self.ranker = Ranker(backend=backend, batcher=self.batcher, cache=self.cache, admission=self.admission,
                             metrics=self.metrics, queue_timeout=s.queue_timeout, worker_timeout=s.worker_timeout,
                             leases=leases)
        self.batcher.start()
        if s.clear_cache_interval > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._clear_cache_every(s.clear_cache_interval)))

    async def _clear_cache_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if self.cache is not None:
                self.cache.clear()

    async def stop(self) -> None:
        if self.registration is not None:  # first: out of the Service before the model goes
            await self.registration.close()
        for task in self._tasks:
            task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.remote is not None:
            await self.remote.close()
        if self.backend is not None:
            self.backend.close()

    @property
    def fault(self) -> str | None:
        """Why this server cannot serve (a failed load, a wedged or dead engine), or None."""
        if self.load_error:
            return self.load_error
        return self.batcher.fault() if self.batcher is not None else None

    def startup(self) -> dict[str, Any]:
        """/health's `startup`: when the process started, when it turned ready, each phase's seconds."""
        total = (self.ready_at or time.time()) - self.started_at
        return {"started_at": round(self.started_at, 3),
                "ready_at": None if self.ready_at is None else round(self.ready_at, 3),
                "seconds": {**{k: round(v, 3) for k, v in self.phases.items()}, "total": round(total, 3)}}

    def health(self) -> dict[str, Any]:
        fault = self.fault
        if self.load_error:
            status = "error"
        elif fault:
            status = "wedged"
        elif self.admission.draining:
            status = "draining"
        elif self.waiting:
            status = "waiting"
        elif not self.admission.ready:
            status = "loading"
        else:
            status = "healthy"
        info = self.backend.info.as_dict() if self.backend is not None else None
        return {
            "status": status,
            "version": __version__,
            "model": info,
            "controller": {**self.admission.controller(), "jobs_held": len(self.ranker.inflight) if self.ranker else 0},
            "cache": {"enabled": self.settings.enable_prediction_cache, "local_entries": len(self.cache) if self.cache else 0,
                      "redis": self.settings.redis_enabled},
            "error": fault,
            "reason": self.waiting,
            "startup": self.startup(),
            "activity": {"requests": self.requests,
                         "last_request_at": None if self.last_request_at is None else round(self.last_request_at, 3)},
        }
