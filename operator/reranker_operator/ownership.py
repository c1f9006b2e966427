"""Which objects a RerankerDeployment owns, and what to say about the ones it does not.

The operator writes an object only if it carries the RerankerDeployment's controller reference
(an owner reference with `controller: true` and the owner's UID), as cert-manager does with
the Secrets it issues. An object of the same name without one (a Service `frontend` that
someone else runs, say) is someone else's: applying the operator's manifest over it with force
would replace its fields (a Service's selector: its traffic to the reranker pods) and adopt it
(deleting the RerankerDeployment would then garbage-collect it). Instead the reconciler leaves
it untouched and reports a `NameConflict`, and does not roll pods that would read a ConfigMap
or Secret it does not own.

Pure functions over plain dicts, like `drift`: the reconciler asks the API server only about
a child its indices do not hold (see `Reconciler._claim`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from reranker import contract
from reranker_operator import status

NAME_CONFLICT = "NameConflict"

ChildKey = tuple[str, str]  # (kind, name)


def controller(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference marked `controller: true`, if any (there is at most one)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


def controlled_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    """Whether `obj`'s controller is the RerankerDeployment with this UID."""
    ref = controller(obj)
    return (ref is not None and uid is not None and str(ref.get("uid")) == str(uid)
            and ref.get("kind") == contract.KIND_DEPLOYMENT
            and str(ref.get("apiVersion", "")).split("/")[0] == contract.API_GROUP)


def conflict(desired: Mapping[str, Any], existing: Mapping[str, Any]) -> status.Problem:
    """The NameConflict problem for `desired`, whose name `existing` already holds."""
    kind, name = desired["kind"], desired["metadata"]["name"]
    ref = controller(existing)
    if ref is None:
        whose = "has no controller"
    else:
        whose = f"is controlled by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"
    return status.Problem(
        NAME_CONFLICT,
        f"{kind} {name} already exists and {whose}, not by this RerankerDeployment: left "
        "untouched (delete or rename it, or give the RerankerDeployment another name)")


def _references(node: Any) -> Iterator[ChildKey]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("configMapKeyRef", "configMapRef", "configMap") and isinstance(
                    value, Mapping) and value.get("name"):
                yield ("ConfigMap", str(value["name"]))
            elif key in ("secretKeyRef", "secretRef") and isinstance(
                    value, Mapping) and value.get("name"):
                yield ("Secret", str(value["name"]))
            elif key == "secret" and isinstance(value, Mapping) and value.get("secretName"):
                yield ("Secret", str(value["secretName"]))
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def consumed(obj: Mapping[str, Any]) -> frozenset[ChildKey]:
    """The ConfigMaps and Secrets a workload's pods read (env, envFrom, volumes)."""
    template = (obj.get("spec") or {}).get("template")
    return frozenset(_references(template)) if template else frozenset()
