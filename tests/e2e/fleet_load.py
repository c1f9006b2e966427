"""Bounded load from the host and a once-a-second recorder of the fleet, for e2e tests that
watch the fleet react (autoscaling, Macs joining and leaving the Service).

`Load` runs closed-loop clients against a URL (a Service's ClusterIP through kube-proxy) until
stopped or out of budget; every request carries documents no request had before, so the
servers' score caches never answer and each pair goes through the queue and the model, and
goes on a connection of its own, so kube-proxy spreads the requests over the backends.
`ApiReader` reads the API server directly with the admin kubeconfig's credentials (one HTTPS
connection, no kubectl process per sample: the recorder runs every second on a 2-core machine).
"""

from __future__ import annotations

import base64
import itertools
import json
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Outcome:
    """What the load's clients saw."""

    ok: int = 0
    #: requests that failed after the client's retry policy (status or error text)
    failed: list[str] = field(default_factory=list)
    #: connection errors that were retried (attempts, not requests)
    retried: int = 0
    #: time.monotonic() of the last one
    last_retry: float | None = None
    statuses: Counter[int] = field(default_factory=Counter)


class Load:
    """CLIENTS threads, each posting one /rerank of DOCS fresh documents at a time to URL.

    Retry policy (the advice of docs/macs.md for clients of the Service): a connection error
    (refused, reset, closed before the response) means the request produced no result, and a
    rerank is idempotent, so it is sent again on a new connection, at once and then with
    doubling pauses, for up to RETRY_WINDOW seconds (0: never). kube-proxy picks a backend per
    connection at random, so a retry can meet the same dead backend again until the operator
    has taken it out of the Service; a window longer than that bound makes the retry land on a
    live one. Any HTTP status but 200 fails the request at once.
    """

    _ids = itertools.count()

    def __init__(self, url: str, *, clients: int, docs: int, max_requests: int = 100_000,
                 retry_window: float = 0.0, timeout: float = 120) -> None:
        self.url, self.clients, self.docs = url, clients, docs
        self.max_requests, self.retry_window, self.timeout = max_requests, retry_window, timeout
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = 0
        self._threads: list[threading.Thread] = []

    def _payload(self) -> dict[str, Any]:
        n = next(self._ids)
        return {"query": f"which passage explains request {n} of the load?",
                "documents": [f"passage {n}.{i}: the reranker scores this text against the "
                              f"query, and request {n} carries it once" for i in range(self.docs)]}

    def _budget(self) -> bool:
        with self._lock:
            self._sent += 1
            return self._sent <= self.max_requests and not self._stop.is_set()

    def _send(self, client: httpx.Client, payload: dict[str, Any]) -> httpx.Response | str:
        """The response, or the error that ended the request."""
        deadline, pause = time.monotonic() + self.retry_window, 0.05
        while True:
            try:
                return client.post(f"{self.url}/rerank", json=payload)
            except httpx.TransportError as e:
                now = time.monotonic()
                if now >= deadline or isinstance(e, httpx.TimeoutException):
                    return f"{type(e).__name__}: {e}"
                with self._lock:
                    self.outcome.retried += 1
                    self.outcome.last_retry = now
                time.sleep(min(pause, deadline - now))
                pause *= 2

    def _client(self) -> None:
        # A new connection per request: kube-proxy picks a backend per connection, so a
        # kept-alive connection would stay on one pod however many the fleet grows to.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=self.timeout, limits=limits) as client:
            while self._budget():
                r = self._send(client, self._payload())
                with self._lock:
                    if isinstance(r, str):
                        self.outcome.failed.append(r)
                        continue
                    self.outcome.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.outcome.ok += 1
                    else:
                        self.outcome.failed.append(f"HTTP {r.status_code}: {r.text[:200]}")

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait(self) -> Outcome:
        """Wait until the budget (max_requests) is spent."""
        for t in self._threads:
            t.join()
        return self.outcome

    def stop(self) -> Outcome:
        """Stop sending; wait for the requests in flight."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
        return self.outcome

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ApiReader:
    """GETs against the API server with the credentials of a kubeconfig (embedded data)."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = json.loads(Path(kubeconfig).read_text())  # hack/cluster writes JSON
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self._dir = tempfile.TemporaryDirectory(prefix="api-reader-")
        files = {}
        for key, name in (("certificate-authority-data", "ca.crt"),
                          ("client-certificate-data", "client.crt"),
                          ("client-key-data", "client.key")):
            data = cluster.get(key) or user.get(key)
            path = Path(self._dir.name) / name
            path.write_bytes(base64.b64decode(data))
            files[name] = str(path)
        tls = ssl.create_default_context(cafile=files["ca.crt"])
        tls.load_cert_chain(files["client.crt"], files["client.key"])
        self.client = httpx.Client(base_url=cluster["server"], verify=tls, timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(path, params=params)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.client.close()
        self._dir.cleanup()


class Recorder:
    """Calls SAMPLE() once a second in a thread; keeps (t since start, result) pairs."""

    def __init__(self, sample: Any, *, period: float = 1.0) -> None:
        self.sample, self.period = sample, period
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append({"t": self.now(), **self.sample()})
            except (httpx.HTTPError, KeyError, ValueError) as e:
                self.errors.append(f"{self.now()}: {type(e).__name__}: {e}")
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def start(self) -> Recorder:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
