"""Servers for tests: the app in-process through its lifespan, and `reranker serve` subprocesses.

A module of its own (not conftest.py) so test modules can import it by a unique name:
tests/kube has a conftest.py too, and two modules named `conftest` collide.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def stop_process_group(proc: "subprocess.Popen[bytes] | None") -> None:
    """SIGTERM a process started with start_new_session=True and its children; SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def running_app(**settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """The app through its lifespan, ready to serve, behind an httpx client."""
    from reranker.app import create_app
    from reranker.settings import Settings

    app = create_app(Settings(**settings))
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        deadline = time.monotonic() + 120
        while not runtime.loaded.is_set():
            assert runtime.load_error is None, runtime.load_error
            assert time.monotonic() < deadline, "model did not load in 120s"
            await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, *, timeout: float,
               what: str) -> None:
    """Until GET url/ready answers 200; AssertionError with the log's tail if the process exits
    or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} not ready in {timeout}s:\n{log.read_text()[-3000:]}")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def wait_ready(self, timeout: float = 120) -> None:
        wait_ready(self.proc, self.url, self.log, timeout=timeout, what="server")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class ServerFactory:
    """Starts `reranker serve` subprocesses on free loopback ports; `close` stops them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[ServerProcess] = []

    def __call__(self, env: dict[str, str] | None = None, *, wait: bool = True, args: list[str] | None = None) -> ServerProcess:
        port = free_port()
        log = self.folder / f"server-{port}.log"
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "INFO", **(env or {})}
        proc = subprocess.Popen([str(VENV_BIN / "reranker"), "serve", *(args or [])], env=full_env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
        self.started.append(server)
        if wait:
            server.wait_ready()
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop()


