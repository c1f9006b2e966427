"""A real `reranker-operator` process against the dev cluster, for tests/kube and tests/e2e.

`Operator` runs it (`reranker-operator --namespace NS`) with its log in a file and checks the
log for RBAC denials and tracebacks at the end; `bind_rbac` gives it exactly the rules of
operator/rbac/ as a ServiceAccount of the test's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from servers import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
RBAC_DIR = REPO / "operator" / "rbac"
OPERATOR_BIN = Path(sys.executable).parent / "reranker-operator"


class Operator:
    """One `reranker-operator` process; its log goes to a file."""

    def __init__(self, cluster: Any, namespace: str, kubeconfig: str, log_path: Path) -> None:
        self.cluster, self.namespace, self.kubeconfig = cluster, namespace, kubeconfig
        self.log_path = log_path
        self.port = 0
        self.offset = 0  # where the current run's log starts
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        self.port = free_port()
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        log = open(self.log_path, "ab")
        log.write(b"\n===== operator start =====\n")
        log.flush()
        self.offset = log.tell()
        self.proc = subprocess.Popen(
            [str(OPERATOR_BIN), "--namespace", self.namespace,
             "--liveness", f"http://127.0.0.1:{self.port}/healthz"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.probe()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"operator not live after 60s:\n{self.log()}")
                time.sleep(0.1)

    def probe(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        stop_process_group(self.proc)
        assert self.proc is None or self.proc.returncode is not None

    @contextlib.contextmanager
    def running(self, cleanup: Callable[[], None], *, tail: int = 6000) -> Iterator[Operator]:
        """Start; at the end stop, clean up, print the log's tail and check it for RBAC denials
        and unexpected errors."""
        try:
            yield self.start()
        finally:
            self.stop()
            cleanup()
            log = self.log()
            print(f"----- operator log (tail) -----\n{log[-tail:]}")
            assert "forbidden" not in log.lower(), "the operator hit an RBAC denial"
            assert "Traceback" not in log, "the operator met an unexpected error"

    def log(self, *, current: bool = False) -> str:
        """The whole log, or only the current run's."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self.offset if current else 0)
            return f.read().decode(errors="replace")

    def writes(self) -> list[str]:
        """The API writes of the current run (the operator logs each one)."""
        return [line for line in self.log(current=True).splitlines()
                if "API write: " in line]

    def wait_log(self, text: str, *, count: int = 1, timeout: float = 30) -> None:
        self.cluster.eventually(lambda: self.log(current=True).count(text) >= count,
                                timeout=timeout, desc=f"{text!r} x{count} in the operator log")


def bind_rbac(cluster: Any, ns: str) -> tuple[str, Callable[[], None]]:
    """operator/rbac/*.yaml, unchanged but for names (per test) and the namespace."""
    suffix = f"reranker-operator-{ns}"
    docs = []
    for path in sorted(RBAC_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = ns
            elif doc["kind"] == "ClusterRole":
                doc["metadata"]["name"] = suffix
            elif doc["kind"] == "ClusterRoleBinding":
                doc["metadata"]["name"] = suffix
                doc["roleRef"]["name"] = suffix
                for subject in doc["subjects"]:
                    subject["namespace"] = ns
            docs.append(doc)
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding",
                                               "ServiceAccount"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    kubeconfig = cluster.mint_kubeconfig(ns, "reranker-operator")

    def cleanup() -> None:
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", suffix,
                        "--ignore-not-found", check=False)
    return kubeconfig, cleanup
