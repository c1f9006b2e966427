"""The node's network: its own bridge, guard rules, the CNI configuration and kube-proxy.

Pods live on 198.18.64.0/24 behind the bridge `rrf0` (198.18.64.1, also the node's and the API
server's address); Services on 198.19.0.0/24. Both ranges are inside 198.18.0.0/15, reserved
for benchmarking networks, and nothing from or to that block may cross an uplink (an interface
with a default route): mangle-table DROP rules (the guard) sit in front of everything else, so
no pod traffic is routed or masqueraded off this machine, whatever kube-proxy or CNI add.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from .certs import client_kubeconfig, write_private
from .console import die
from .processes import start, wait_for

BRIDGE = "rrf0"
NODE_IP = "198.18.64.1"
POD_CIDR = "198.18.64.0/24"
GUARDED = "198.18.0.0/15"
CNI_NETWORK = "reranker-dev"
GUARD_CHAINS = {"RRF-GUARD-IN": ("PREROUTING", "-i"), "RRF-GUARD-OUT": ("POSTROUTING", "-o")}


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        die(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


def bridge_exists() -> bool:
    return run("ip", "link", "show", BRIDGE, check=False).returncode == 0


def create_bridge() -> None:
    """The bridge exists (with the node address) before anything binds to that address."""
    if not bridge_exists():
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "replace", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")


def delete_bridge() -> None:
    if bridge_exists():
        run("ip", "link", "del", BRIDGE)


def uplinks() -> list[str]:
    """Interfaces that lead off the machine: those carrying a default route."""
    names = set()
    for family in ("-4", "-6"):
        out = run("ip", family, "-o", "route", "show", "default", check=False).stdout
        names |= {f[f.index("dev") + 1] for f in map(str.split, out.splitlines()) if "dev" in f}
    return sorted(names)


def add_guard() -> None:
    """DROP anything from or to 198.18.0.0/15 on the uplinks, before any NAT. Other local
    interfaces in that block (test namespaces on veths) stay reachable."""
    links = uplinks()
    for chain, (hook, iface_flag) in GUARD_CHAINS.items():
        remove_guard_chain(chain, hook)
        ipt = ("iptables", "-w", "-t", "mangle")
        run(*ipt, "-N", chain)
        for link in links:
            for addr_flag in ("-s", "-d"):
                run(*ipt, "-A", chain, iface_flag, link, addr_flag, GUARDED, "-j", "DROP")
        run(*ipt, "-I", hook, "1", "-j", chain)


def remove_guard_chain(chain: str, hook: str) -> None:
    ipt = ("iptables", "-w", "-t", "mangle")
    while run(*ipt, "-D", hook, "-j", chain, check=False).returncode == 0:
        pass
    run(*ipt, "-F", chain, check=False)
    run(*ipt, "-X", chain, check=False)


def remove_guard() -> None:
    for chain, (hook, _) in GUARD_CHAINS.items():
        remove_guard_chain(chain, hook)


def write_cni_config(conf_dir: Path, ipam_dir: Path) -> None:
    """bridge + host-local on the pod range (no masquerade), then portmap for hostPorts;
    containerd brings up `lo` in every sandbox itself."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    ipam_dir.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                      "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (conf_dir / "10-reranker-dev.conflist").write_text(json.dumps(conflist, indent=2) + "\n")


def start_kube_proxy(d: Path, binary: Path, *, server: str, node_name: str, healthz_port: int,
                     metrics_port: int) -> subprocess.Popen[bytes]:
    """kube-proxy in iptables mode, touching no sysctl (conntrack settings 0, no
    route_localnet) and serving NodePorts on the pod bridge only."""
    node = d / "node"
    kubeconfig = node / "kube-proxy.kubeconfig"
    write_private(kubeconfig, client_kubeconfig(server, d / "pki", "kube-proxy"))
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "nodePortAddresses": [POD_CIDR],
        "iptables": {"localhostNodePorts": False},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
    }
    cfg = node / "kube-proxy.yaml"
    cfg.write_text(json.dumps(config, indent=2) + "\n")
    proc = start(d, "kube-proxy", binary, [f"--config={cfg}"])
    wait_healthz_http(d, proc, healthz_port)
    return proc


def wait_healthz_http(d: Path, proc: subprocess.Popen[bytes], port: int) -> None:
    """kube-proxy's /healthz turns 200 once it has programmed the rules (plain HTTP)."""

    def check() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200, str(r.status)
        except OSError as e:
            return False, str(e)

    wait_for("kube-proxy /healthz", check, {"kube-proxy": proc}, d, 60)
