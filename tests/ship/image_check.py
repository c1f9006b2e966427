"""Runs inside the server image (tests/ship/test_images.py): the image's CMD, one request, drain.

Standard library only (it runs on the image's Python before anything is known to work).
Prints one line `RESULT {json}`: who it ran as, what it could write, what /health says is
serving, the scores of one request, and the server's exit status after SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

QUERY = sys.argv[1]
DOCUMENTS = json.loads(sys.argv[2])
CMD = json.loads(sys.argv[3])
PORT = os.environ.get("PORT", "8000")
BASE = f"http://127.0.0.1:{PORT}"


def get(path: str) -> dict:
    with urllib.request.urlopen(BASE + path, timeout=5) as r:
        return json.load(r)


server = subprocess.Popen(CMD)
start = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(BASE + "/ready", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if server.poll() is not None:
        sys.exit(f"the server exited with {server.returncode} before it was ready")
    if time.monotonic() - start > 300:
        server.kill()
        sys.exit(f"not ready in 300 s: {get('/health')}")
    time.sleep(0.25)
ready_seconds = time.monotonic() - start

request = urllib.request.Request(
    BASE + "/v1/rerank", data=json.dumps({"query": QUERY, "documents": DOCUMENTS}).encode(),
    headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as r:
    rerank = json.load(r)
health = get("/health")

writes = {}
for path in ("/opt/venv/probe", "/home/reranker/probe", "/probe", "/tmp/probe", "/cache/probe"):
    try:
        with open(path, "w") as f:
            f.write("x")
        writes[path] = "written"
    except OSError as exc:
        writes[path] = exc.strerror or str(exc)

server.terminate()
exit_code = server.wait(timeout=120)
print("RESULT " + json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "ready_seconds": round(ready_seconds, 1),
    "model": health["model"], "startup": health.get("startup"), "results": rerank["results"],
    "writes": writes, "exit_code": exit_code,
    "torch": importlib.util.find_spec("torch") is not None,
}), flush=True)
