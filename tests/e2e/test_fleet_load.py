"""The e2e load's counts tell the truth: a request is sent again only when it got no byte of an
answer, every send again is counted (`resent` when the request had gone out, `retried` when
the connection was refused), and a connection lost in the middle of an answer fails the
request, however long the retry window. So the fleet tests' "0 failed" hides nothing.

The server here is a few lines of socket code, not the reranker: these cases need a connection
reset at a chosen point of the exchange, which a real server does only by accident. No node is
needed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from fleet_load import Load

OK = b'{"results": []}'


class ScriptedServer:
    """Answers each request with the next action of the script ("ok" once it is spent):
    "ok": 200 with a JSON body, the connection kept alive; "reset": the request read, the
    connection reset before any byte of an answer; "partial": the status line and headers,
    then a reset."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.requests = 0
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                with self._lock:
                    self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += conn.recv(65536)
        return True

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while self._read_request(conn):
                with self._lock:
                    self.requests += 1
                    action = self.script.pop(0) if self.script else "ok"
                if action == "reset":
                    return self._reset(conn)
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" \
                       f"Content-Length: {len(OK)}\r\n\r\n".encode()
                if action == "partial":
                    conn.sendall(head)
                    time.sleep(0.3)  # the client reads the head before the reset
                    return self._reset(conn)
                conn.sendall(head + OK)
        conn.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    s = ScriptedServer(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("keepalive", [False, True], ids=["new-connections", "keepalive"])
@pytest.mark.parametrize("server", [["ok", "reset"]], indirect=True)
def test_a_reset_before_any_byte_of_the_answer_is_resent_and_counted(
        server: ScriptedServer, keepalive: bool) -> None:
    outcome = Load(server.url, clients=1, max_requests=3, keepalive=keepalive).start().wait()
    assert str(outcome) == "3 ok / 0 failed / 1 resent / 0 retried", outcome.sent_again
    assert server.requests == 4  # the reset one was sent twice
    assert "resent after ReadError" in outcome.sent_again[0], outcome.sent_again
    # kept alive, the resend needed a new connection: two in all; else one per request
    assert server.connections == (2 if keepalive else 4)


@pytest.mark.parametrize("server", [["partial"]], indirect=True)
def test_a_reset_in_the_middle_of_the_answer_fails_the_request(server: ScriptedServer) -> None:
    outcome = Load(server.url, clients=1, max_requests=2, retry_window=5).start().wait()
    assert (outcome.ok, outcome.resent, outcome.retried) == (1, 0, 0), outcome
    (failure,) = outcome.failed
    assert "bytes of the answer" in failure, failure
    assert server.requests == 2  # not sent again


def test_a_refused_connection_is_retried_for_the_window_then_fails() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    outcome = Load(url, clients=1, max_requests=1, retry_window=0.5).start().wait()
    took = time.monotonic() - t0
    assert outcome.ok == 0 and outcome.resent == 0 and len(outcome.failed) == 1, outcome
    assert "ConnectError" in outcome.failed[0], outcome.failed
    # at once, then after 0.05, 0.1, 0.2 s and at the end of the window
    assert 3 <= outcome.retried <= 6, outcome.sent_again
    assert 0.5 <= took < 2, took


@pytest.mark.parametrize("server", [["reset", "reset"]], indirect=True)
def test_without_a_window_a_request_is_sent_again_once(server: ScriptedServer) -> None:
    outcome = Load(server.url, clients=1, max_requests=1).start().wait()
    assert (outcome.ok, outcome.resent, len(outcome.failed)) == (0, 1, 1), outcome
    assert server.requests == 2
