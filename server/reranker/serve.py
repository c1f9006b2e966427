"""Running the app under uvicorn, with a drain on SIGTERM.

uvicorn on its own closes the listening socket at the first SIGTERM, so a Kubernetes
readiness probe can never see the pod go unready and clients still routed to it get
connection errors. Here the first SIGTERM (or Ctrl-C) only starts draining: /ready turns 503,
requests in flight finish, and requests that still arrive are served too, each answered with
`Connection: close` (a request on a kept-alive connection in the instant before it is closed, or
through a kube-proxy not yet updated: refusing them with 503 failed 4 of 1,172 requests in a
rolling update under load). Kept-alive client connections are closed as they go idle (at once if
idle, after their response if busy): by SIGTERM Kubernetes has taken the pod out of the Service
(the pod's preStop sleep), so a client's next connection goes to another pod. When no request is
in flight, or RERANKER_DRAIN_SECONDS have passed (requests still queued then get 503 with
Retry-After), uvicorn's own shutdown runs and the process exits 0.
A second signal exits at once.

A server registered as an external endpoint (a Mac, `registration`) has no kubelet and no
preStop to take it out of the Service first: it deletes its RerankerEndpoint at SIGTERM and
keeps accepting and serving (each answer with `Connection: close`) until that has had time to
reach the EndpointSlice and kube-proxy (`Registration.out_of_service`); the drain above starts
then. Both stay within RERANKER_DRAIN_SECONDS.

A model that cannot load never will: the process then exits (code 4) instead of staying up
unready forever, after writing why to the termination log when there is one (Kubernetes'
/dev/termination-log), so a supervisor restarts it and shows the reason (the pod's status,
the operator's Degraded condition).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import FrameType

import uvicorn

from . import logs
from .app import create_app
from .errors import NotReady
from .settings import Settings

log = logging.getLogger(__name__)

#: Where Kubernetes reads a container's termination message (its default terminationMessagePath).
TERMINATION_LOG = Path("/dev/termination-log")
#: The exit code of a server whose model failed to load.
EXIT_LOAD_FAILED = 4


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.drain_started: float | None = None
        self.connections_released = False
        self.load_error: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is not None:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        self.drain_started = time.monotonic()
        app = self._app()
        if app is not None and hasattr(app.state, "runtime"):
            app.state.runtime.admission.draining = True
        log.info("signal %s: draining (up to %.0fs)", sig, self.drain_seconds)

    def _app(self):  # type: ignore[no-untyped-def]
        app = self.config.loaded_app
        while app is not None and not hasattr(app, "state"):
            app = getattr(app, "app", None)  # unwrap uvicorn's middleware (proxy headers etc.)
        return app

    def _out_of_service(self) -> bool:
        """No registration holds the drain back (see `Registration.out_of_service`)."""
        registration = getattr(getattr(getattr(self._app(), "state", None), "runtime", None),
                               "registration", None)
        return registration is None or bool(registration.out_of_service())

    async def on_tick(self, counter: int) -> bool:
        runtime = getattr(getattr(self._app(), "state", None), "runtime", None)
        if runtime is not None and runtime.load_error and self.load_error is None:
            self.load_error = runtime.load_error
            message = f"model load failed: {runtime.load_error}"
            log.error("%s: exiting", message)
            if TERMINATION_LOG.exists():
                TERMINATION_LOG.write_text(message[-4000:])
            self.should_exit = True
        if self.drain_started is not None and not self._out_of_service() and (
                time.monotonic() - self.drain_started < self.drain_seconds):
            return await super().on_tick(counter)  # a Mac still in its Service: keep accepting
        if self.drain_started is not None and not self.connections_released:
            self.connections_released = True
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle: closed now; busy: `Connection: close` after it
        if self.drain_started is not None and not self.should_exit:
            app = self._app()
            inflight = app.state.runtime.admission.inflight if app is not None and hasattr(app.state, "runtime") else 0
            elapsed = time.monotonic() - self.drain_started
            if inflight == 0 or elapsed >= self.drain_seconds:
                log.info("drained (%d requests left after %.1fs): shutting down", inflight, elapsed)
                if inflight and app is not None and app.state.runtime.ranker is not None:
                    # Requests still queued get a clean 503 now rather than being cut off later.
                    app.state.runtime.ranker.abort_waiting(
                        NotReady("the server shut down before this request was served; retry", retry_after=1))
                self.should_exit = True
        return await super().on_tick(counter)


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    app = create_app(settings)
    # HTTPS where a certificate is given (a Mac whose fleet probes it over TLS: docs/macs.md).
    certfile, keyfile = settings.tls_certfile, settings.tls_keyfile
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, log_level=settings.log_level.lower(),
                            ssl_certfile=str(certfile) if certfile else None,
                            ssl_keyfile=str(keyfile) if keyfile else None)
    server = DrainingServer(config, drain_seconds=settings.drain_seconds)
    server.run()
    if server.load_error is not None:
        return EXIT_LOAD_FAILED
    return 0 if server.started else 3
