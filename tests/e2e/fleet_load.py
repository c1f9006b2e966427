"""Bounded load from the host and a once-a-second recorder of the fleet, for e2e tests that
watch the fleet react (a deleted pod, a rollout, autoscaling, Macs joining and leaving the
Service).

`Load` runs closed-loop clients against a URL (a Service's ClusterIP through kube-proxy) until
stopped or out of budget, and counts what happened to every request: answered 200 (`ok`),
failed, and each time one was sent again, so "0 failed" cannot hide requests that needed a
second try. A request is sent again only when it produced no result: its connection was refused
(`retried`: the request never went out) or reset before the first byte of the answer (`resent`:
it went out, no server answered). Anything after a byte of the answer fails it.

The byte counts come from httpcore's network backend interface (the transport under httpx, which
does not expose it): a stream that counts what each request's connection wrote and read.
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx


@dataclass
class Outcome:
    """What the load's clients saw."""

    ok: int = 0
    #: requests that failed (status, or the error and how much of the answer had come)
    failed: list[str] = field(default_factory=list)
    #: sends again after the connection failed before the request went out (refused)
    retried: int = 0
    #: sends again after the request went out and the connection closed before any byte of
    #: the answer
    resent: int = 0
    #: time.monotonic() of the last retry or resend
    last_retry: float | None = None
    #: one line per retry or resend: when, which, the error
    sent_again: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def __str__(self) -> str:
        return (f"{self.ok} ok / {len(self.failed)} failed / {self.resent} resent / "
                f"{self.retried} retried")


class _Tally:
    """Bytes written and read on the connection of the request in flight."""

    def __init__(self) -> None:
        self.sent = self.received = 0


class _CountingStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, tally: _Tally) -> None:
        self._stream, self._tally = stream, tally

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._stream.read(max_bytes, timeout)
        self._tally.received += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._tally.sent += len(buffer)
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _CountingStream(self._stream.start_tls(*args, **kwargs), self._tally)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CountingBackend(httpcore.NetworkBackend):
    def __init__(self, tally: _Tally) -> None:
        self._backend, self._tally = httpcore.SyncBackend(), tally

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CountingStream(stream, self._tally)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        return _CountingStream(self._backend.connect_unix_socket(path, timeout, socket_options),
                               self._tally)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class Load:
    """CLIENTS threads, each posting one /rerank at a time to URL.

    Bodies: DOCS fresh documents per request (no score cache answers: each pair goes through
    the queue and the model), or BODY, the same for every request (the caches answer: the load
    measures routing). Connections: a new one per request (kube-proxy picks a backend per
    connection, so the requests spread over the backends), or with KEEPALIVE one per client,
    reused (a draining pod closes its idle kept-alive connections: the race with a request
    written on one in that instant is the reset before any byte that a client resends).

    Sending again (a rerank is idempotent): a request that got no byte of an answer because its
    connection was refused or reset is sent again on a new connection at once, then with
    doubling pauses until RETRY_WINDOW seconds after its first failure (the advice of
    docs/macs.md for clients of the Service: a window longer than the time the operator takes
    a dead backend out makes the retry land on a live one). Timeouts, errors after a byte of
    the answer, and any status but 200 fail the request at once. INTERVAL: each client's pause
    between requests.
    """

    _ids = itertools.count()

    def __init__(self, url: str, *, clients: int, docs: int = 4,
                 body: dict[str, Any] | None = None, keepalive: bool = False,
                 interval: float = 0.0, max_requests: int = 100_000, retry_window: float = 0.0,
                 timeout: float = 120) -> None:
        self.url, self.clients, self.docs, self.body = url, clients, docs, body
        self.keepalive, self.interval = keepalive, interval
        self.max_requests, self.retry_window, self.timeout = max_requests, retry_window, timeout
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = 0
        self._threads: list[threading.Thread] = []

    def _payload(self) -> dict[str, Any]:
        if self.body is not None:
            return self.body
        n = next(self._ids)
        return {"query": f"which passage explains request {n} of the load?",
                "documents": [f"passage {n}.{i}: the reranker scores this text against the "
                              f"query, and request {n} carries it once" for i in range(self.docs)]}

    def _budget(self) -> bool:
        with self._lock:
            self._sent += 1
            return self._sent <= self.max_requests and not self._stop.is_set()

    def _post(self, pool: httpcore.ConnectionPool, tally: _Tally,
              body: bytes) -> httpcore.Response:
        tally.sent = tally.received = 0
        return pool.request("POST", f"{self.url}/rerank", content=body,
                            headers={"Content-Type": "application/json"},
                            extensions={"timeout": {kind: self.timeout for kind in
                                                    ("connect", "read", "write", "pool")}})

    def _send(self, pool: httpcore.ConnectionPool, tally: _Tally,
              body: bytes) -> httpcore.Response | str:
        """The response, or why the request failed."""
        first_failure, pause = None, 0.05
        while True:
            try:
                return self._post(pool, tally, body)
            except httpcore.TimeoutException as e:
                return f"{type(e).__name__} after {tally.received} bytes of the answer: {e}"
            except (httpcore.NetworkError, httpcore.RemoteProtocolError) as e:
                error = f"{type(e).__name__}: {e}"
                if tally.received:
                    return f"{error} (after {tally.received} bytes of the answer)"
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.retry_window:
                    return f"{error} (sent again until {self.retry_window} s after the first)"
                with self._lock:
                    if tally.sent:
                        self.outcome.resent += 1
                    else:
                        self.outcome.retried += 1
                    self.outcome.last_retry = now
                    self.outcome.sent_again.append(
                        f"{time.strftime('%H:%M:%S')} {'resent' if tally.sent else 'retried'}"
                        f" after {error}")
                if now > first_failure:  # the first send again goes at once
                    time.sleep(min(pause, max(0.0, first_failure + self.retry_window - now)))
                    pause *= 2

    def _client(self) -> None:
        tally = _Tally()
        with httpcore.ConnectionPool(max_connections=1,
                                     max_keepalive_connections=1 if self.keepalive else 0,
                                     network_backend=_CountingBackend(tally)) as pool:
            while self._budget():
                r = self._send(pool, tally, json.dumps(self._payload()).encode())
                with self._lock:
                    if isinstance(r, str):
                        self.outcome.failed.append(r)
                    else:
                        self.outcome.statuses[r.status] += 1
                        if r.status == 200:
                            self.outcome.ok += 1
                        else:
                            self.outcome.failed.append(
                                f"HTTP {r.status}: {r.content[:200].decode(errors='replace')}")
                if self.interval:
                    self._stop.wait(self.interval)

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
