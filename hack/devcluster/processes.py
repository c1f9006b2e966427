"""The cluster's daemons: started in their own session with a pid file each, stopped by pid.

A pid is only trusted while /proc shows the same program with this state dir on its command
line, so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from .console import log, verbose

#: Start order; `stop` goes backwards.
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns",
         "containerd", "kubelet", "kube-proxy", "prometheus", "prometheus-adapter")


class StartFailed(Exception):
    def __init__(self, msg: str, port_clash: bool):
        super().__init__(msg)
        self.port_clash = port_clash


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int, name: str, d: Path) -> bool:
    """True if pid is alive and really is our `name` for this cluster dir (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return bool(cmdline) and os.path.basename(cmdline[0].decode()) == name and \
        str(d).encode() in b" ".join(cmdline)


def running(d: Path) -> dict[str, int]:
    out = {}
    for name in ORDER:
        pf = d / "run" / f"{name}.pid"
        if pf.exists():
            with contextlib.suppress(ValueError):
                pid = int(pf.read_text().strip())
                if pid_alive(pid, name, d):
                    out[name] = pid
    return out


def start(d: Path, name: str, binary: Path, args: Sequence[str], *,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    logs = d / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (d / "run").mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as lf, open(os.devnull, "rb") as nul:
        p = subprocess.Popen([str(binary), *args], stdin=nul, stdout=lf, stderr=subprocess.STDOUT,
                             cwd=d, start_new_session=True, pass_fds=pass_fds)
    (d / "run" / f"{name}.pid").write_text(f"{p.pid}\n")
    return p


def stop(d: Path, names: Iterable[str] = ORDER, *, quiet: bool = False,
         grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, in reverse start order."""
    procs = running(d)
    wanted = set(names)
    for name in reversed(ORDER):
        pid = procs.get(name)
        if pid is None or name not in wanted:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pid_alive(pid, name, d) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        if pid_alive(pid, name, d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not quiet:
            log(f"stopped {name} (pid {pid})")


def wait_for(desc: str, check: Callable[[], tuple[bool, str]],
             procs: dict[str, subprocess.Popen[bytes]], d: Path, timeout: float) -> None:
    """Poll check() until it returns (True, _); fail early if one of procs exits."""
    start_t = time.monotonic()
    deadline = start_t + timeout
    detail = ""
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                fail(d, f"{name} exited with code {p.returncode} while waiting for {desc}", name)
        ok, detail = check()
        if ok:
            if verbose():
                log(f"  {desc}: {time.monotonic() - start_t:.1f}s")
            return
        time.sleep(0.2)
    fail(d, f"timed out after {timeout:.0f}s waiting for {desc}: {detail[:300]}", None)


def fail(d: Path, msg: str, name: str | None) -> NoReturn:
    """Show the tail of the failing component's log (all logs if unknown) and raise."""
    clash = False
    for n in ([name] if name else ORDER):
        lf = d / "logs" / f"{n}.log"
        if lf.exists():
            text = lf.read_text(errors="replace")
            clash = clash or "address already in use" in text
            log(f"--- last lines of {lf} ---")
            for line in text.splitlines()[-25:]:
                print(f"    {line}", file=sys.stderr)
    raise StartFailed(msg, clash)
