"""etcd: plain HTTP on loopback, throw-away data (--unsafe-no-fsync) in the state dir."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from .processes import start, wait_for


def start_etcd(d: Path, binary: Path, client_port: int,
               peer_port: int) -> subprocess.Popen[bytes]:
    return start(d, "etcd", binary, [
        "--name=dev", f"--data-dir={d / 'etcd-data'}",
        f"--listen-client-urls=http://127.0.0.1:{client_port}",
        f"--advertise-client-urls=http://127.0.0.1:{client_port}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=dev=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--log-level=warn",
    ])


def wait_etcd(d: Path, proc: subprocess.Popen[bytes], client_port: int) -> None:
    def healthy() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health",
                                        timeout=1) as r:
                body = r.read().decode()
            return '"health":"true"' in body, body
        except OSError as e:
            return False, str(e)

    wait_for("etcd", healthy, {"etcd": proc}, d, 60)
