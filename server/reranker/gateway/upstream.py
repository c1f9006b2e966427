"""Sending a request to a fleet's endpoints: one bounded connection pool per endpoint, one
deadline, and the retries that cannot change an answer.

The client is aiohttp's: on this path the client's CPU time is the gateway's overhead. With httpx
the forwarding took ~70% of the gateway's CPU samples (py-spy at 200 requests/s of small requests,
bench/gateway_overhead.py); with aiohttp ~12%, and the gateway's CPU per request halved.

- One pool per endpoint (RERANKER_GATEWAY_ENDPOINT_MAX_CONNECTIONS): an endpoint that hangs
  ties up its own connections only, and picking sees its outstanding pairs grow and avoids it.
- One deadline per request (RERANKER_GATEWAY_REQUEST_TIMEOUT_SECONDS) covers the pool wait, every
  try and every answer; past it the connection is closed (the server sees its client go and drops
  the work) and the client gets the server's own 503 `request_timeout`.
- Reranking is idempotent, so a connection refused or reset before a whole answer arrived is sent
  again to another endpoint (up to RERANKER_GATEWAY_MAX_RETRIES), and a 429/503 (a full queue, a
  draining or loading pod) once more to another endpoint (Envoy's retry_on: reset,
  connect-failure, retriable-status-codes; with a retry budget of one for refusals).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from ..errors import RequestTimeout
from .affinity import Affinity
from .directory import Endpoint, Fleet
from .errors import UpstreamUnavailable
from .metrics import GatewayMetrics
from .picking import Loads

#: Headers passed on to the server and back to the client (hop-by-hop and length headers are not).
FORWARD_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "traceparent", "tracestate",
                   "user-agent")
RETURN_HEADERS = ("content-type", "retry-after", "x-compute-time", "x-request-id")
_REFUSED = (429, 503)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]
    endpoint: Endpoint


class Upstreams:
    def __init__(self, *, loads: Loads, affinity: Affinity | None, metrics: GatewayMetrics, max_connections: int,
                 connect_timeout: float, max_retries: int) -> None:
        self.loads, self.affinity, self.metrics = loads, affinity, metrics
        self.max_retries = max_retries
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._clients: dict[str, aiohttp.ClientSession] = {}
        self._gates: dict[str, asyncio.Semaphore] = {}

    def client(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        client = self._clients.get(endpoint.url)
        if client is None:
            # The bound is `_gate`'s; the connector has room to spare so that no request ever queues in it.
            # Idle connections are dropped before the server's own keep-alive timeout (uvicorn: 5 s)
            # would close them under a request.
            connector = aiohttp.TCPConnector(limit=2 * self.max_connections, keepalive_timeout=4)
            client = self._clients[endpoint.url] = aiohttp.ClientSession(
                base_url=endpoint.url, connector=connector, trust_env=False, auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def first(self, fleet: Fleet, key: str | None, model: str, pairs: int) -> Endpoint | None:
        usable = self.loads.usable(fleet.endpoints)
        if self.affinity is not None and key is not None and len(fleet.endpoints) > 1:
            picked = self.affinity.pick(key, fleet.endpoints, self.loads.load, usable, weight=pairs)
            if picked is not None:
                endpoint, home = picked
                self.metrics.affinity.labels(model=model, result="hit" if home else "spill").inc()
                return endpoint
        return self.loads.pick(fleet.endpoints)

    async def send(self, fleet: Fleet, *, path: str, body: bytes, headers: Mapping[str, str], pairs: int,
                   deadline: float, model: str, key: str | None = None, endpoint: Endpoint | None = None) -> Answer:
        """POST `body` to one of `fleet`'s endpoints (`endpoint` first if given), retrying as above."""
        tried: set[str] = set()
        refusals = connects = 0
        last: Answer | None = None
        current = endpoint or self.first(fleet, key, model, pairs)
        while current is not None:
            tried.add(current.url)
            try:
                answer = await self._post(current, path=path, body=body, headers=headers, pairs=pairs,
                                          deadline=deadline, model=model)
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, cut off: nothing was answered
                if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
                    self.loads.eject(current)  # could not connect at all (a reset may be a stale kept-alive connection)
                connects += 1
                if connects > self.max_retries:
                    raise UpstreamUnavailable(f"no endpoint of fleet {fleet.namespace}/{fleet.name} could be "
                                              f"reached ({exc.__class__.__name__}: {exc})", retry_after=1) from None
                # another endpoint; with none left, the same one again on a new connection
                current = self.loads.pick(fleet.endpoints, exclude=tried) or current
                self.metrics.retries.labels(model=model, reason="connect").inc()
                continue
            if answer.status in _REFUSED and refusals == 0:
                refusals += 1
                last = answer
                current = self.loads.pick(fleet.endpoints, exclude=tried)
                if current is not None:
                    self.metrics.retries.labels(model=model, reason="refused").inc()
                    continue
            return answer
        assert last is not None
        return last

    def _gate(self, endpoint: Endpoint) -> asyncio.Semaphore:
        gate = self._gates.get(endpoint.url)
        if gate is None:
            gate = self._gates[endpoint.url] = asyncio.Semaphore(self.max_connections)
        return gate

    async def _post(self, endpoint: Endpoint, *, path: str, body: bytes, headers: Mapping[str, str], pairs: int,
                    deadline: float, model: str) -> Answer:
        timed_out = RequestTimeout(f"no answer from {endpoint.name} within the request's deadline "
                                   "(RERANKER_GATEWAY_REQUEST_TIMEOUT_SECONDS)", retry_after=1)
        self.loads.start(endpoint, pairs)
        load_header: str | None = None
        status = "error"
        gate = self._gate(endpoint)
        try:
            # Waiting for a connection happens here, where a cancelled waiter (a client gone, a
            # deadline) is simply gone; the client library never queues a request.
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await gate.acquire()
            except TimeoutError:
                status = "timeout"
                raise timed_out from None
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                    raise timed_out
                timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=min(self.connect_timeout, remaining))
                async with self.client(endpoint).post(path, data=body, headers=headers, timeout=timeout) as response:
                    content = await response.read()
            except aiohttp.ConnectionTimeoutError:
                raise  # another endpoint may answer: `send` retries it
            except TimeoutError:  # the deadline: aiohttp has closed the connection (the server sees its client go)
                status = "timeout"
                raise timed_out from None
            finally:
                gate.release()
            load_header = response.headers.get("endpoint-load-metrics")
            status = str(response.status)
            kept = {name: response.headers[name] for name in RETURN_HEADERS if name in response.headers}
            return Answer(status=response.status, body=content, headers=kept, endpoint=endpoint)
        finally:
            self.loads.finish(endpoint, pairs, header=load_header)
            self.metrics.upstream.labels(model=model, endpoint=endpoint.name, status=status).inc()
