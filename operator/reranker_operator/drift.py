"""Is a write needed? Pure comparison of a desired child with the live object.

An idle operator must make no API writes, yet a deleted or hand-edited child must come back.
Two checks decide, without asking the API server:

1. The applied hash: every child carries `reranker.dev/applied-hash`, a hash of the manifest
   the operator last applied. A different desired manifest (a spec change, including a field
   that was removed) means apply. Server-side apply then also removes the fields the operator
   no longer sets, because it owns them.
2. Containment: every field the operator sets must still hold its value in the live object
   (someone may have edited it). Fields the API server or other controllers add are ignored.
   The comparison knows the API server's normalisations: quantities are canonicalised
   ("0.5" is stored as "500m"), and empty values (omitempty) are dropped.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from reranker import contract
from reranker_operator.spec import quantity

ANNOTATION_APPLIED_HASH = f"{contract.API_GROUP}/applied-hash"

#: Keys whose value is a resource.Quantity, and maps whose values all are.
_QUANTITY_KEYS = frozenset({"averageValue", "sizeLimit"})
_QUANTITY_MAPS = frozenset({"limits", "requests"})

_ABSENT = object()


def applied_hash(manifest: Mapping[str, Any]) -> str:
    body = copy.deepcopy(dict(manifest))
    meta = body.get("metadata", {})
    annotations = meta.get("annotations")
    if annotations is not None:
        annotations.pop(ANNOTATION_APPLIED_HASH, None)
        if not annotations:
            del meta["annotations"]
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stamp(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the manifest carrying its own applied hash."""
    out = copy.deepcopy(dict(manifest))
    digest = applied_hash(out)
    out.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = digest
    return out


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == {} or value == [] or value is False


def _quantities_equal(a: Any, b: Any) -> bool:
    try:
        return quantity(a) == quantity(b)
    except (ValueError, TypeError, ArithmeticError):
        return False


def contained(desired: Any, live: Any, *, key: str | None = None,
              quantity: bool = False) -> bool:
    """Whether every field of `desired` holds the same value in `live`."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return _empty(desired) and _empty(live)
        for k, v in desired.items():
            lv = live.get(k, _ABSENT)
            if lv is _ABSENT:
                if not _empty(v):
                    return False
            elif not contained(v, lv, key=k, quantity=key in _QUANTITY_MAPS):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(live, list):
            return _empty(desired) and live is None
        if key == "ownerReferences":  # other owners may be listed too
            return all(any(contained(d, item) for item in live) for d in desired)
        return len(desired) == len(live) and all(
            contained(d, item) for d, item in zip(desired, live))
    if desired == live:
        return True
    if quantity or key in _QUANTITY_KEYS:
        return _quantities_equal(desired, live)
    return False


def needs_apply(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """`desired` is stamped (see `stamp`); `live` is the object as the API server has it."""
    if live is None:
        return True
    want = desired.get("metadata", {}).get("annotations", {}).get(ANNOTATION_APPLIED_HASH)
    have = (live.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    if want is None or want != have:
        return True
    return not contained(_without_status(desired), live)


def _without_status(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    return {k: v for k, v in manifest.items() if k != "status"}
