"""The node's iptables chains: which chains exist, and removing the ones the node made.

The kubelet (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...) and kube-proxy (KUBE-SERVICES, KUBE-SVC-*,
...) name every chain they make KUBE-*, and so does any other Kubernetes on the host (k3s,
kubeadm's kube-proxy). So `down` does not remove every KUBE-* chain, nor run `kube-proxy
--cleanup` (which removes any kube-proxy's chains): `up` records the chains that exist before
its first change, and `down` removes only the KUBE-* chains that are new since, with the rules
that jump to them. `up` refuses to start a node beside another kubelet or kube-proxy, so a
KUBE-* chain that appears while the node runs is the node's.
"""

from __future__ import annotations

import shlex
import subprocess

FAMILIES = ("iptables", "ip6tables")
TABLES = ("filter", "nat", "mangle", "raw")
PREFIX = "KUBE-"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


def _rules(family: str, table: str) -> list[list[str]] | None:
    """`iptables -S` of one table as argument lists; None when the table cannot be listed."""
    r = _run(family, "-w", "-t", table, "-S")
    if r.returncode != 0:
        return None
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def chains() -> dict[str, list[str]]:
    """The user-defined chains of every table, keyed "<family> <table>"."""
    out = {}
    for family in FAMILIES:
        for table in TABLES:
            rules = _rules(family, table)
            if rules is not None:
                out[f"{family} {table}"] = sorted(a[1] for a in rules if a[:1] == ["-N"])
    return out


def _target(args: list[str]) -> str | None:
    for flag in ("-j", "-g"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return None


def remove_new_chains(before: dict[str, list[str]]) -> list[str]:
    """Remove the KUBE-* chains that are not in `before` (a `chains()` taken earlier) and
    every rule elsewhere that jumps to one; chains that existed stay, with their rules.
    Return "<family> <table> <chain>" of each removed chain."""
    removed = []
    for family in FAMILIES:
        for table in TABLES:
            rules = _rules(family, table)
            if rules is None:
                continue
            old = set(before.get(f"{family} {table}", ()))
            new = {a[1] for a in rules if a[:1] == ["-N"] and a[1].startswith(PREFIX)
                   and a[1] not in old}
            if not new:
                continue
            ipt = (family, "-w", "-t", table)
            for args in rules:
                if args[:1] == ["-A"] and args[1] not in new and _target(args) in new:
                    _run(*ipt, "-D", *args[1:])
            for flag in ("-F", "-X"):  # flush all first: new chains jump to each other
                for chain in sorted(new):
                    _run(*ipt, flag, chain)
            removed += [f"{family} {table} {chain}" for chain in sorted(new)]
    return removed
