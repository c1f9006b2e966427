"""The server process's life: readiness, graceful shutdown on SIGTERM, and disconnected clients.

These run the real `reranker serve` under uvicorn in a subprocess, because signals and TCP
disconnects are what they test.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx

from servers import ServerProcess

WORDS = "apple river data model kernel queue cache python paris token server batch query night fast".split()


def docs(n: int, tag: str, words: int = 120) -> list[str]:
    return [f"{tag} {i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) for i in range(n)]


def post_in_thread(url: str, body: dict, out: list,  # type: ignore[type-arg]
                   start: threading.Barrier | None = None) -> threading.Thread:
    """POST from a thread; with `start`, every thread's client is made before any sends, so the
    requests reach the server within milliseconds of each other."""
    def run() -> None:
        with httpx.Client(timeout=120) as client:
            if start is not None:
                start.wait(30)
            try:
                r = client.post(url, json=body)
                out.append((r.status_code, dict(r.headers), r.text))
            except httpx.HTTPError as exc:  # recorded: the test asserts none happened
                out.append((0, {}, repr(exc)))
    t = threading.Thread(target=run)
    t.start()
    return t


def summary(server: ServerProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(server.url + "/metrics", headers={"accept": "application/json"}, timeout=10).json()


def test_sigterm_drains_in_flight_work_and_exits_zero(uvicorn_server: Callable[..., ServerProcess]) -> None:
    # A long queue timeout: this is about draining, not admission. On a loaded 2-core machine the
    # warm-up measured 11 pairs/s and admission refused 2-4 of the six requests up front (429).
    server = uvicorn_server({"ENABLE_PREDICTION_CACHE": "false", "RERANKER_BATCH_SIZE": "8", "RERANKER_DRAIN_SECONDS": "60",
                             "RERANKER_QUEUE_TIMEOUT": "600"})
    results: list = []  # type: ignore[type-arg]
    # Sent together: on a quiet machine, requests sent one after another finished before the
    # last one arrived, and six were never in flight at once.
    start = threading.Barrier(6)
    threads = [post_in_thread(server.url + "/rerank", {"query": f"query {i}", "documents": docs(40, f"t{i}")},
                              results, start) for i in range(6)]
    deadline = time.monotonic() + 60  # tokenizing 6 x 40 long documents next to a busy forward takes seconds on 2 cores
    while summary(server)["controller"]["inflight_requests"] < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert summary(server)["controller"]["inflight_requests"] == 6
    server.proc.send_signal(signal.SIGTERM)
    saw_unready, late = False, None
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/ready", timeout=1).status_code == 503:
                saw_unready = True
                if late is None:  # arrives while draining (as through a kube-proxy not yet updated)
                    late = httpx.post(server.url + "/rerank", json={"query": "late", "documents": ["x"]}, timeout=60)
        except httpx.HTTPError:
            pass  # the socket closes once drained
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0
    assert saw_unready, "/ready never answered 503 while draining"
    # served, not refused, and told to go elsewhere next time
    assert late is not None and late.status_code == 200, late and late.text
    assert late.headers["connection"] == "close"
    assert [status for status, _, _ in results] == [200] * 6, results
    assert all(len(json.loads(text)["results"]) == 40 for _, _, text in results)


def test_disconnected_client_pairs_are_not_computed(uvicorn_server: Callable[..., ServerProcess]) -> None:
    server = uvicorn_server({"ENABLE_PREDICTION_CACHE": "false", "RERANKER_BATCH_SIZE": "4", "MICRO_BATCH_WINDOW_MS": "0"})
    out: list = []  # type: ignore[type-arg]
    busy = post_in_thread(server.url + "/rerank", {"query": "busy", "documents": docs(60, "busy")}, out)
    time.sleep(0.3)
    # The client that goes away: a raw socket, closed before its answer can come.
    body = json.dumps({"query": "gone", "documents": docs(60, "gone")}).encode()
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30  # gone only once its request is in flight (admitted, pairs queued)
    while summary(server)["controller"]["inflight_requests"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    busy.join(120)
    assert out and out[0][0] == 200
    deadline = time.monotonic() + 30
    while summary(server)["controller"]["waiting"] or summary(server)["controller"]["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'reranker_rejected_total{reason="client_gone"} 1.0' in metrics
    scored = summary(server)["pairs_scored"]
    assert 60 <= scored <= 60 + 4, scored  # at most one batch of the gone client's pairs had started


def test_ready_is_503_until_loaded_and_warm(uvicorn_server: Callable[..., ServerProcess]) -> None:
    server = uvicorn_server(wait=False)
    seen: set[int] = set()
    saw_loading = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(server.url + "/ready", timeout=1)
            seen.add(r.status_code)
            if r.status_code == 200:
                break
            # the model may finish loading between two calls: only a consistent pair counts
            health = httpx.get(server.url + "/health", timeout=1).json()["status"]
            early = httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["d"]}, timeout=5)
            if health == "loading" and early.status_code == 503:
                assert early.json()["error"] == "not_ready" and "retry-after" in early.headers
                saw_loading = True
            else:  # loading finished between the calls
                assert early.status_code in (200, 503) and health in ("loading", "healthy")
        except httpx.ConnectError:
            pass
        time.sleep(0.02)
    assert saw_loading
    assert 200 in seen and 503 in seen, seen


def test_requests_still_queued_at_the_drain_deadline_get_503(uvicorn_server: Callable[..., ServerProcess]) -> None:
    server = uvicorn_server({"ENABLE_PREDICTION_CACHE": "false", "RERANKER_BATCH_SIZE": "2", "RERANKER_DRAIN_SECONDS": "1"})
    out: list = []  # type: ignore[type-arg]
    t = post_in_thread(server.url + "/rerank", {"query": "slow", "documents": docs(200, "slow")}, out)
    deadline = time.monotonic() + 10
    while summary(server)["controller"]["inflight_requests"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 15
    t.join(30)
    status, headers, text = out[0]
    assert status == 503 and "retry-after" in headers, (status, text)
    assert json.loads(text)["error"] == "not_ready"


def test_a_model_that_cannot_load_ends_the_process_with_code_4(
        uvicorn_server: Callable[..., ServerProcess], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A supervisor (Kubernetes, launchd) must see it and say why, not find a live but never
    ready server."""
    missing = tmp_path / "no-such-model"
    server = uvicorn_server({"RERANKER_MODEL": str(missing), "HF_HUB_OFFLINE": "1"}, wait=False)
    assert server.proc.wait(timeout=120) == 4, server.log.read_text()[-2000:]
    assert "model load failed" in server.log.read_text()


def test_draining_closes_kept_alive_connections(uvicorn_server: Callable[..., ServerProcess]) -> None:
    """By SIGTERM the pod is out of the Service: an idle kept-alive connection is closed so the
    client's next request opens a connection to another pod instead of getting a 503 here."""
    server = uvicorn_server({"ENABLE_PREDICTION_CACHE": "false", "RERANKER_DRAIN_SECONDS": "60"})
    results: list = []  # type: ignore[type-arg]
    busy = post_in_thread(server.url + "/rerank", {"query": "q", "documents": docs(60, "busy")}, results)
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            response += kept.recv(65536)
        head, body = response.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += kept.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        while summary(server)["controller"]["inflight_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        kept.settimeout(2)  # well within uvicorn's own 5 s keep-alive timeout
        assert kept.recv(65536) == b"", "the idle connection stayed open while draining"
        assert server.proc.poll() is None  # still draining the busy request
    busy.join(120)
    assert server.proc.wait(60) == 0
    assert [status for status, _, _ in results] == [200], results
