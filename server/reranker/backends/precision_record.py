"""One precision per fleet: a measured precision decision, taken once and then read by every replica.

Why: `auto` picks a precision by timing candidates at start (bf16 against fp32, int8-dynamic
against the float pick). Timing depends on what else the machine runs, so two pods of one
fleet started under load picked different precisions (int8-dynamic and fp32 in one cold CI
run): their scores differed, their model fingerprints too, so the fleet's shared Redis score
cache never hit across them. A decision is therefore recorded the first time it is measured and
read, not measured again, by every later start with the same inputs:

- The key is everything the decision depends on except its outcome: the model (name, revision,
  kind, max length), the runtime and its version, what was asked (`auto`, or int8 whose float
  layers are raced), the policy (candidates, floors) and the CPU's instruction-set flags (the
  int8 and bf16 kernels differ between VNNI and AMX). A pod on another CPU type decides anew.
- In Redis when the fleet has one (REDIS_ENABLED, REDIS_URL: the operator's managed Redis):
  the first writer wins (SET NX) and every replica serves what Redis holds. A pod that finds
  another one measuring (a lease, SET NX with an expiry) waits a bounded time for its record,
  then measures itself; a record already in Redis beats this pod's own measurement.
- On disk in the model cache folder (RERANKER_MODEL_CACHE_DIR, which a fleet may share on a
  volume, and which survives a container restart), written atomically (a temporary file, then
  `os.replace`): a reader sees a whole record or none.
- Read-only sources, read after the cache folder and before measuring: the seed dirs
  (RERANKER_MODEL_SEED_DIRS: what `reranker convert` measured into an image or a fleet's volume)
  and RERANKER_PRECISION_RECORD_DIR (the operator's ConfigMap of the fleet's records, one
  `<key>.json` each, the same bytes as the disk record). A record found there is published to Redis
  and copied to the cache folder like a disk record.

Redis being down never fails a start: the decision then rests on the disk record or a fresh
measurement, with a warning. The record says who measured it and when; /health's
`model.precision` says it was recorded by the fleet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: How long a starting pod waits for another pod's measurement before measuring itself (and how
#: long a measuring pod's lease lasts if it dies): a MiniLM-sized model measures in ~5-10 s on
#: 2 vCPUs; a large one on a loaded node may take a minute.
WAIT_SECONDS = 120.0

#: Delete the lease only if this pod still holds it (another may hold it after ours expired).
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def default_cache_dir() -> Path:
    """RERANKER_MODEL_CACHE_DIR's default: $XDG_CACHE_HOME/reranker-fleet (~/.cache/reranker-fleet)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reranker-fleet"


def record_key(fields: Mapping[str, object]) -> str:
    """A short digest of everything a decision depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:20]


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part:
    a temporary file in the same folder, flushed, then renamed over `path`."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Decision:
    """A recorded decision: `plan` is what the backend needs to serve it again without measuring
    (JSON-able), `origin` where this start got it from."""

    plan: dict[str, Any]
    origin: str  # "measured" | "recorded by the fleet (redis)" | "recorded on disk"

    @property
    def recorded(self) -> bool:
        return self.origin != "measured"

    def describe(self) -> str:
        """How /health tells where the pick came from."""
        if not self.recorded:
            return "measured at this start and recorded for the fleet"
        by, at = self.plan.get("measured_by", "?"), self.plan.get("measured_at", "?")
        return f"{self.origin}: measured by {by} at {at}, not timed again"


class PrecisionRecord:
    """The record of one decision (one key), in Redis and/or a folder."""

    def __init__(self, key: str, *, folder: Path | None, redis_url: str | None, prefix: str = "reranker",
                 wait_seconds: float = WAIT_SECONDS, poll_seconds: float = 0.5, timeout: float = 2.0,
                 sources: Sequence[tuple[Path, str]] = ()) -> None:
        self.key = key
        self.path = folder / f"precision-{key}.json" if folder is not None else None
        self.sources = list(sources)  # read-only (file, origin) pairs, in order
        self.redis_key = f"{prefix}:precision:{key}"
        self.lease_key = f"{self.redis_key}:measuring"
        self.wait_seconds, self.poll_seconds = wait_seconds, poll_seconds
        self._redis: Any = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)

    # --- the protocol -----------------------------------------------------------------------
    def agree(self, measure: Callable[[], dict[str, Any]]) -> Decision:
        """The fleet's decision: Redis's record, else the disk's (published to Redis), else this
        pod's measurement (`measure()` returns the plan), recorded where it can be."""
        found = self._get()
        if found is not None:
            self._save(found)
            return Decision(found, "recorded by the fleet (redis)")
        on_disk = self._load()
        if on_disk is not None:
            return self._publish(on_disk, origin="recorded on disk")
        for path, origin in self.sources:
            found = _read(path)
            if found is not None:
                return self._publish(found, origin=origin)
        token = uuid.uuid4().hex
        if not self._lease(token):  # another replica is measuring: wait for its record
            found = self._wait()
            if found is not None:
                self._save(found)
                return Decision(found, "recorded by the fleet (redis)")
            log.warning("precision: the replica that was measuring left no record (waited up to %.0f s); "
                        "measuring here", self.wait_seconds)
        try:
            plan = {**measure(), "measured_by": socket.gethostname(),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            return self._publish(plan, origin="measured")
        finally:
            self._release(token)

    def _publish(self, plan: dict[str, Any], *, origin: str) -> Decision:
        """First writer wins: SET NX; if another replica recorded first, its plan serves here too."""
        # redis-py's SET NX answers True or None (taken); bool() keeps None for "no Redis / it failed"
        if self._call("record", lambda r: bool(r.set(self.redis_key, json.dumps(plan), nx=True))) is False:
            winner = self._get()
            if winner is not None and winner != plan:
                log.warning("precision: another replica recorded its pick first; serving that one")
                self._save(winner)
                return Decision(winner, "recorded by the fleet (redis)")
        self._save(plan)
        return Decision(plan, origin)

    def _wait(self) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.wait_seconds
        while time.monotonic() < deadline:
            found = self._get()
            if found is not None:
                return found
            if not self._call("lease check", lambda r: r.exists(self.lease_key)):
                return self._get()  # the measuring replica gave up (or died and its lease expired)
            time.sleep(self.poll_seconds)
        return None

    # --- Redis, every call bounded and forgiving ------------------------------------------------
    def _call(self, what: str, op: Callable[[Any], Any]) -> Any:
        """`op(client)`, or None without Redis or when it fails (logged: the start goes on)."""
        if self._redis is None:
            return None
        import redis

        try:
            return op(self._redis)
        except redis.RedisError as exc:
            log.warning("precision: Redis %s failed (%s: %s); deciding without the fleet's record", what,
                        exc.__class__.__name__, exc)
            return None

    def _get(self) -> dict[str, Any] | None:
        raw = self._call("read", lambda r: r.get(self.redis_key))
        return _parse(raw)

    def _lease(self, token: str) -> bool:
        """True when this pod may measure now: it took the lease, or there is no Redis to ask."""
        taken = self._call("lease", lambda r: bool(r.set(self.lease_key, token, nx=True,
                                                         px=int(self.wait_seconds * 1000))))
        return taken is not False  # None (no Redis, or it failed): measure here

    def _release(self, token: str) -> None:
        self._call("lease release", lambda r: r.eval(_RELEASE, 1, self.lease_key, token))

    # --- the disk copy ------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any] | None:
        return None if self.path is None else _read(self.path)

    def _save(self, plan: dict[str, Any]) -> None:
        if self.path is None or self._load() == plan:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(plan, sort_keys=True))
        except OSError as exc:  # a read-only cache folder: Redis (if any) still carries the decision
            log.warning("precision: could not record the decision in %s (%s)", self.path, exc)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(raw: bytes | str | None) -> dict[str, Any] | None:
    """A record, or None for none or a garbled one (measured again rather than trusted)."""
    if raw is None:
        return None
    try:
        plan = json.loads(raw)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) else None
