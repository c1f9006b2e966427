"""The operator-managed Redis, run for real: the container's args and env as the operator
renders them, expanded as the kubelet expands `$(VAR)`, started as a real redis-server on a
loopback port. Without the password nothing can read, write or FLUSHALL it; the server pods'
REDIS_URL (expanded the same way) gets in. The NetworkPolicy is checked as a manifest (there
is no network plugin here that enforces policies).
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import free_port  # noqa: E402

from reranker_operator import manifests  # noqa: E402
from reranker_operator.spec import parse  # noqa: E402

DEFAULTS = manifests.Defaults(server_image="img:1", redis_image="redis:1")
OWNER = {"apiVersion": "reranker.dev/v1alpha1", "kind": "RerankerDeployment",
         "metadata": {"name": "rr", "namespace": "ns", "uid": "u-1"},
         "spec": {"model": {"id": "m"}, "cache": {"redis": {"managed": {"enabled": True}}}}}


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) -> its value, $$ -> $ (the kubelet's expansion of args and env values)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def resolve_env(container: dict[str, Any], secret_data: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = kubelet_expand(var["value"], env)
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = secret_data[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


@pytest.fixture
def managed_redis(tmp_path: Path) -> Any:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make system-deps`"
    spec = parse(OWNER["spec"])
    password = secrets.token_hex(24)
    secret = manifests.redis_password_secret(OWNER, password)
    objs = {(o["kind"], o["metadata"]["name"]): o
            for o in manifests.children(OWNER, spec, DEFAULTS)}
    (redis_c,) = objs[("Deployment", "rr-redis")]["spec"]["template"]["spec"]["containers"]
    env = resolve_env(redis_c, secret["stringData"])
    args = [kubelet_expand(a, env) for a in redis_c["args"]]
    port = free_port()
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path)],
                            stdout=(tmp_path / "redis.log").open("ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password=password).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.05)
        (server_c,) = objs[("Deployment", "rr")]["spec"]["template"]["spec"]["containers"]
        server_env = resolve_env(server_c, secret["stringData"])
        yield port, server_env["REDIS_URL"]
    finally:
        proc.kill()
        proc.wait(10)


def test_the_managed_redis_refuses_clients_without_the_password(managed_redis: Any) -> None:
    port, url = managed_redis
    anonymous = redis.Redis(port=port)
    for command in (("SET", "reranker:x", "poison"), ("FLUSHALL",), ("GET", "reranker:x")):
        with pytest.raises(redis.AuthenticationError):
            anonymous.execute_command(*command)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, password="guess").ping()
    # The server pods' URL (host swapped for the loopback port) carries the password.
    pods = redis.Redis.from_url(url.replace("rr-redis:6379", f"127.0.0.1:{port}"))
    assert pods.set("reranker:x", b"1") and pods.get("reranker:x") == b"1"
