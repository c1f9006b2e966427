"""The cluster's own address ranges, learned from the API: where no external endpoint may be.

An address inside the pod or Service ranges (or a node's own address) is another workload's:
listing it behind a fleet's Service would send the fleet's clients, bearer tokens included,
to that workload in plain HTTP (the class of CVE-2021-25740). A Mac's identity must never be
able to do that, so the operator does not depend on someone having configured the ranges:

- pods: every Node's `spec.podCIDRs` (what the node IPAM controller or the installer gave
  it), and the nodes' own addresses (hostNetwork pods, NodePorts);
- Services: the `ServiceCIDR` objects of networking.k8s.io/v1 (GA in Kubernetes 1.33; the
  API server creates the one of its `--service-cluster-ip-range` itself). The API server's
  Service `kubernetes` in `default` only shows the range's first address, not its size, so it
  cannot stand in for them.

The ranges configured on the operator (`RERANKER_OPERATOR_CLUSTER_CIDRS`, the chart's
`clusterCIDRs`) are added to what is learned. Where something cannot be learned (a node whose
CNI assigns pod addresses itself and leaves `spec.podCIDRs` empty; an API server without
ServiceCIDRs) and nothing is configured, the ranges are *unknown* and registered endpoints are
refused, with the reason, until they are known: fail closed. A cluster without nodes has no
pod addresses to protect, so an empty node list is known (its pod range is empty).

Pure: the prober calls `learn` with what Kopf's indices hold (`node_facts`, `service_cidr_facts`
reduce each object to the few fields that matter).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from reranker_operator.external import Network

#: Node addresses that are the node's own (hostNetwork pods, NodePorts listen there).
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


@dataclasses.dataclass(frozen=True)
class ClusterRanges:
    """The pod and Service ranges the operator knows, and why registrations wait if it does
    not know them all."""

    networks: tuple[Network, ...] = ()
    #: None when known; else why registered endpoints are refused.
    unknown: str | None = None


def node_facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a Node contributes: its name, pod ranges and own addresses."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    addresses = [a.get("address") for a in status.get("addresses") or ()
                 if a.get("type") in NODE_ADDRESS_TYPES and a.get("address")]
    return {"name": (body.get("metadata") or {}).get("name"), "podCIDRs": cidrs,
            "addresses": addresses}


def service_cidr_facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a ServiceCIDR contributes: its name and ranges."""
    return {"name": (body.get("metadata") or {}).get("name"),
            "cidrs": list((body.get("spec") or {}).get("cidrs") or ())}


def _network(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        return None


def learn(*, nodes: Iterable[Mapping[str, Any]], service_cidrs: Iterable[Mapping[str, Any]],
          configured: tuple[Network, ...] = ()) -> ClusterRanges:
    """The ranges from the nodes' and ServiceCIDRs' facts, united with the configured ones."""
    networks: list[Network] = list(configured)
    without_pod_cidrs: list[str] = []
    for node in nodes:
        cidrs = [n for n in (_network(c) for c in node.get("podCIDRs") or ()) if n is not None]
        if not cidrs:
            without_pod_cidrs.append(str(node.get("name")))
        networks += cidrs
        networks += [n for n in (_network(a) for a in node.get("addresses") or ())
                     if n is not None]
    service = [n for sc in service_cidrs for n in (_network(c) for c in sc.get("cidrs") or ())
               if n is not None]
    networks += service

    reasons = []
    if without_pod_cidrs and not configured:
        # Three names, each cut short: the message must fit a status field (1024 characters).
        shown = ", ".join(n[:63] for n in sorted(without_pod_cidrs)[:3])
        more = len(without_pod_cidrs) - 3
        plural = len(without_pod_cidrs) > 1
        reasons.append(f"node{'s' if plural else ''} {shown}"
                       f"{f' and {more} more' if more > 0 else ''} "
                       f"{'have' if plural else 'has'} no spec.podCIDRs (the CNI assigns pod "
                       "addresses itself)")
    if not service and not configured:
        reasons.append("no ServiceCIDR (networking.k8s.io/v1) is known (Kubernetes before "
                       "1.33 does not serve them)")
    unknown = None
    if reasons:
        unknown = ("registrations are refused until the operator knows the cluster's pod and "
                   f"Service ranges: {'; '.join(reasons)}. Set them on the operator "
                   "(RERANKER_OPERATOR_CLUSTER_CIDRS, the chart's clusterCIDRs)")
    unique = tuple(dict.fromkeys(networks))
    return ClusterRanges(networks=unique, unknown=unknown)
