"""One request through the gateway: read, route, hold, pick, forward (or fan out), answer.

Bad input is answered here with the server's own status and body and never forwarded: a body over
the size limit, JSON that does not parse, nests too deep or holds invalid Unicode, a field the
server's schema refuses, a model no fleet serves. A client that goes away cancels what was
forwarded for it (closing those connections, which the servers see as their client going away).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request, Response

from ..errors import APIError, ClientGone
from ..reading import parse_body, read_body
from .affinity import Affinity
from .dialects import Parsed, check_documents, read
from .directory import Directory
from .errors import render
from .fanout import fan_out, width
from .hold import Holds
from .metrics import GatewayMetrics
from .picking import Loads
from .routing import Router
from .settings import GatewaySettings
from .upstream import FORWARD_HEADERS, Answer, Upstreams


async def _client_gone(request: Request) -> None:
    """The body is read; the next ASGI message can only be the client going away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    """The gateway's state: the directory, routing, holds, loads and pools; `handle` serves a request."""

    def __init__(self, settings: GatewaySettings, directory: Directory, *, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.metrics = metrics or GatewayMetrics()
        self.router = Router(directory, default_model=settings.default_model)
        self.holds = Holds(directory, self.router, self.metrics, timeout=settings.hold_timeout_seconds,
                           limit=settings.max_held_requests)
        self.loads = Loads(report_seconds=settings.load_report_seconds)
        self.upstreams = Upstreams(loads=self.loads,
                                   affinity=Affinity(balance=settings.affinity_balance) if settings.affinity else None,
                                   metrics=self.metrics, max_connections=settings.endpoint_max_connections,
                                   connect_timeout=settings.connect_timeout_seconds, max_retries=settings.max_retries)

    async def close(self) -> None:
        await self.upstreams.close()

    async def handle(self, request: Request, route: str, *, path_model: str | None = None) -> Response:
        started = time.perf_counter()
        dialect = model = ""
        status = 500
        try:
            body = await read_body(request, self.settings.max_body_bytes)
            data: Any = await parse_body(body)
            dialect = "tei" if route == "/rerank" and isinstance(data, dict) and "texts" in data else ""
            parsed = read(route, data, path_model=path_model)
            dialect = parsed.dialect
            check_documents(parsed, self.settings.max_documents)
            fleet = self.router.fleet(parsed.model)
            model = fleet.served_names[0] if fleet.served_names else fleet.name
            answer = await self._forward_unless_gone(request, parsed, body, model)
            status = answer.status
            return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))
        except APIError as exc:
            response = render(exc, dialect=dialect)
            status = response.status_code
            return response
        except ClientGone:
            status = 499
            return Response(status_code=499)  # nobody reads it; the access log shows nginx's "client closed"
        finally:
            self.metrics.requests.labels(model=model, dialect=dialect, status=str(status)).inc()
            self.metrics.duration.labels(model=model, dialect=dialect).observe(time.perf_counter() - started)

    async def _forward_unless_gone(self, request: Request, parsed: Parsed, body: bytes, model: str) -> Answer:
        loop = asyncio.get_running_loop()
        work = loop.create_task(self._forward(request, parsed, body, model))
        watcher = loop.create_task(_client_gone(request))
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()  # the client left: closing the forwarded connections tells the servers
            raise ClientGone()
        return work.result()

    async def _forward(self, request: Request, parsed: Parsed, body: bytes, model: str) -> Answer:
        fleet = await self.holds.ready(self.router.fleet(parsed.model))
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        headers = {name: request.headers[name] for name in FORWARD_HEADERS if name in request.headers}
        path = request.url.path
        parts = width(parsed, fleet, threshold=self.settings.fanout_threshold, max_width=self.settings.fanout_max_width)
        self.metrics.fanout_width.labels(model=model).observe(parts)
        if parts > 1:
            return await fan_out(self.upstreams, fleet, parsed, whole=body, parts=parts, path=path, headers=headers,
                                 deadline=deadline, model=model)
        return await self.upstreams.send(fleet, path=path, body=body, headers=headers, pairs=parsed.documents,
                                         deadline=deadline, model=model, key=parsed.key)
