"""Stand-in Macs: `reranker serve` processes with addresses of their own in a network namespace.

The API server refuses loopback addresses in EndpointSlices, and this workplace's network rule
allows test traffic only to loopback or to network namespaces the session made itself. So
`mac_network_namespace` creates a network namespace (`rr-macs-PID`) joined to the root
namespace by a veth pair: the root side gets 198.18.N.1/24, the namespace side the Macs'
addresses 198.18.N.2 and .3 (198.18.0.0/15 is reserved for network tests and never routed; N is
the first /24 no interface holds, so it never meets the dev node's pod range). Those are the
addresses the Macs advertise, the EndpointSlice lists, the operator probes and kube-proxy
forwards Service traffic to. Each `reranker serve` stays in the root namespace (it must reach
the API server), on 198.18.N.1 and a port of its own, and a relay in the namespace
(tests/tcp_relay.py) forwards the Mac's address and shared port to it over the veth; the relay
listens only while its server does, so a killed Mac refuses connections like a real one.
Killing a Mac kills its server; restarting it starts the server again on the same port. The
namespace, veth and relays are removed afterwards, also when a test fails. Creating them needs
root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns`), which the test machines have; the
fixtures (tests/conftest.py: `mac_netns`, `mac_network`) fail with the reason otherwise.

Used by tests/kube/test_external_endpoints.py (registration, probes, the operator's
EndpointSlice) and tests/e2e/test_macs_in_service.py (requests through kube-proxy).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

RELAY = Path(__file__).resolve().with_name("tcp_relay.py")
SLICE_MANAGER = "reranker-operator.reranker.dev"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class MacNetwork:
    """A network namespace holding the stand-in Macs' addresses, joined to the root namespace
    by a veth pair whose root side (`host`) the Macs' servers listen on; relays in the
    namespace make each server reachable at its Mac's address."""

    def __init__(self, name: str, host: str, addresses: list[str], log_dir: Path) -> None:
        self.name, self.host, self.addresses, self.log_dir = name, host, addresses, log_dir
        self.relays: dict[tuple[str, int], tuple[int, subprocess.Popen[bytes]]] = {}

    def free_port(self) -> int:
        """A port free on every Mac address (each Mac listens on the same port, like real
        Macs): asked of the namespace's kernel."""
        r = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c",
                            "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); "
                            "print(s.getsockname()[1])"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    def server_port(self, address: str, port: int) -> int:
        """The root-namespace port of the server behind ADDRESS:PORT; starts the relay from
        ADDRESS:PORT to it on first use (it outlives restarts of the server)."""
        if (address, port) not in self.relays:
            with socket.socket() as s:
                s.bind((self.host, 0))
                server_port = int(s.getsockname()[1])
            log = self.log_dir / f"relay-{address}-{port}.log"
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, str(RELAY),
                 "--listen", f"{address}:{port}", "--to", f"{self.host}:{server_port}"],
                stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            self.relays[(address, port)] = (server_port, proc)
        return self.relays[(address, port)][0]

    def stop_relays(self) -> None:
        for _, proc in self.relays.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        self.relays.clear()


@contextlib.contextmanager
def mac_network_namespace(log_dir: Path) -> Iterator[MacNetwork]:
    """The Macs' network namespace (module docstring); removed at the end, whatever happened."""
    pid = os.getpid()
    name, host_if, ns_if = f"rr-macs-{pid}", f"rrm{pid}h", f"rrm{pid}n"  # names <= 15 chars
    _ip("netns", "del", name)  # left over by a crashed session of the same pid
    _ip("link", "del", host_if)
    subnet = next((n for n in range(256) if not _ip(
        "-4", "-o", "address", "show", "to", f"198.18.{n}.0/24").stdout.strip()), None)
    if subnet is None:
        pytest.fail("no free /24 in 198.18.0.0/16 for the Macs' network namespace", pytrace=False)
    prefix = f"198.18.{subnet}"
    network = MacNetwork(name, f"{prefix}.1", [f"{prefix}.2", f"{prefix}.3"],
                         log_dir)
    steps = [("netns", "add", name),
             ("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name),
             ("address", "add", f"{network.host}/24", "dev", host_if),
             ("link", "set", host_if, "up"),
             *(("-n", name, "address", "add", f"{a}/24", "dev", ns_if) for a in network.addresses),
             ("-n", name, "link", "set", ns_if, "up"),
             ("-n", name, "link", "set", "lo", "up"),
             ("netns", "exec", name, "true")]  # the relays run through `ip netns exec`
    try:
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.fail(f"cannot set up the Macs' network namespace: `ip {' '.join(step)}` "
                            f"exited {r.returncode}: {r.stderr.strip()} (needs root: "
                            "CAP_NET_ADMIN and CAP_SYS_ADMIN; EndpointSlices refuse 127.0.0.1, "
                            "and probes may go only to loopback or to such a namespace)",
                            pytrace=False)
        yield network
    finally:
        network.stop_relays()
        r = _ip("netns", "pids", name)  # anything else of ours still in it
        for pid_text in r.stdout.split() if r.returncode == 0 else ():
            try:
                os.kill(int(pid_text), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", name)  # takes the veth pair with it
        _ip("link", "del", host_if)



class Mac:
    """A `reranker serve` process standing in for a Mac: MLX backend, registering itself.

    The server runs in the root namespace on the veth's root side and a port of its own; the
    network's relay makes it reachable at the Mac's address and PORT, which it registers. A
    new Mac for the same address and port (a restart) gets the same server port. With `tls`
    (certificate, key, CA bundle: PEM files) it serves HTTPS, as RERANKER_TLS_* make it."""

    def __init__(self, factory: Any, network: MacNetwork, *, address: str, port: int,
                 env: dict[str, str], tls: tuple[Path, Path, Path] | None = None) -> None:
        self.factory, self.network = factory, network
        self.address, self.port, self.env, self.tls = address, port, env, tls
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"

    def start(self) -> Mac:
        server_port = self.network.server_port(self.address, self.port)
        tls_env = {} if self.tls is None else {"RERANKER_TLS_CERTFILE": str(self.tls[0]),
                                               "RERANKER_TLS_KEYFILE": str(self.tls[1])}
        self.server = self.factory({**self.env, **tls_env, "HOST": self.network.host,
                                    "PORT": str(server_port),
                                    "RERANKER_REGISTER_PORT": str(self.port)}, wait=False)
        self.server.url = self.url
        if self.tls is None:
            self.server.wait_ready()
        else:  # verified against the CA, as the operator's probes do
            deadline = time.monotonic() + 120
            while not self._ready(verify=str(self.tls[2])):
                assert self.server.proc.poll() is None, self.log()[-3000:]
                assert time.monotonic() < deadline, f"not ready in 120 s:\n{self.log()[-3000:]}"
                time.sleep(0.1)
        return self

    def _ready(self, *, verify: str) -> bool:
        try:
            context = ssl.create_default_context(cafile=verify)
            return httpx.get(f"{self.url}/ready", verify=context, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: int) -> int:
        self.server.proc.send_signal(sig)
        return int(self.server.proc.wait(30))

    def log(self) -> str:
        return str(self.server.log.read_text(errors="replace"))


def certificates(folder: Path, address: str, *, name: str) -> tuple[Path, Path, Path]:
    """A CA NAME and a server certificate it issues for ADDRESS (an IP SAN), made with the
    openssl command: (certificate, key, CA certificate), PEM files in FOLDER."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / f"{name}-ca.crt", folder / f"{name}-ca.key"
    crt, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName=IP:{address}\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\n")
    for args in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
             "-days", "2", "-subj", f"/CN={name} CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={address}"],
            ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext]):
        r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return crt, key, ca


def slice_endpoints(cluster: Any, ns: str, service: str) -> dict[str, dict[str, Any]]:
    """address -> {ready, serving, port} over the operator's EndpointSlices of a Service."""
    slices = cluster.get_json("endpointslices", "-n", ns, "-l",
                              f"kubernetes.io/service-name={service},"
                              f"endpointslice.kubernetes.io/managed-by={SLICE_MANAGER}")["items"]
    out = {}
    for s in slices:
        (port,) = s["ports"]
        assert port["name"] == "http"
        for ep in s.get("endpoints") or ():
            for address in ep["addresses"]:
                out[address] = {"ready": ep["conditions"]["ready"],
                                "serving": ep["conditions"]["serving"], "port": port["port"]}
    return out
