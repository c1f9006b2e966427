"""Endpoints that misbehave on demand: refuse with 503, hang after reading the request, or reset the
connection. A real server cannot be made to do these at a chosen moment here (its refusals depend
on load and timing), so these raw TCP stand-ins play the pod that does, on a loopback port, in a
thread of the test process; they record when each connection of theirs was closed by the gateway.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Literal

Mode = Literal["refuse", "hang", "reset"]

_REFUSAL = json.dumps({"error": "queue_full", "message": "stand-in pod refuses"}).encode()


class StandIn:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.connections = 0
        self.closed_at: list[float] = []  # when the gateway closed a connection we never answered
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if self.mode == "reset":
                    writer.transport.abort()
                    return
                if self.mode == "hang":
                    await reader.read()  # until the gateway closes the connection
                    return
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if self.mode == "hang":  # never answered: the gateway (or its client) closed it
                self.closed_at.append(time.monotonic())
            writer.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
