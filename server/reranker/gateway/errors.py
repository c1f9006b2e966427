"""The gateway's own errors, in the server's types and shapes (reranker.errors).

A client behind the gateway must not tell it from a server: bad input gets the server's own
exceptions (raised by the server's reading code), and what only a gateway can hit (a fleet that
stays at zero, an endpoint that cannot be reached, too many held requests) subclasses the server's
error of the same meaning, so its status, Retry-After and TEI shape come out the same way.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import APIError, NotReady, QueueFull, tei_error


class FleetUnavailable(NotReady):
    """The fleet had no ready endpoint within RERANKER_GATEWAY_HOLD_TIMEOUT_SECONDS."""

    code = "fleet_unavailable"


class HoldFull(QueueFull):
    """RERANKER_GATEWAY_MAX_HELD_REQUESTS requests already wait for fleets to wake."""

    code = "hold_full"


class UpstreamUnavailable(NotReady):
    """No endpoint of the fleet could be reached (connection refused or reset on every try)."""

    code = "upstream_unavailable"


def render(exc: APIError, *, dialect: str | None) -> JSONResponse:
    """`exc` as a server would answer it: TEI's body for TEI-shaped requests, else the house shape."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    if dialect == "tei":
        status, error_type = tei_error(exc)
        return JSONResponse({"error": exc.message, "error_type": error_type}, status_code=status, headers=headers)
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers)
