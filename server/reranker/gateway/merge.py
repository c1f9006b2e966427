"""Merging the answers of a fanned-out request into the answer one server would give.

The servers are batch-invariant (a pair's score does not depend on what it was batched with), so
every part's scores are the ones one server would compute; merging is then exact: indices shifted
by the part's offset, results ordered as the server orders them (best score first, ties by index),
cut to the request's top n, token usage summed. Ids, `meta` and the model name come from the first
part; `processing_time_ms` is the slowest part's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The list of results and the score each dialect orders it by.
_RESULTS = {"native": ("results", "score"), "vllm": ("results", "relevance_score"),
            "cohere-v1": ("results", "relevance_score"), "cohere-v2": ("results", "relevance_score"),
            "nim": ("rankings", "logit")}


def _ranked(items: list[dict[str, Any]], score: str, top: int | None) -> list[dict[str, Any]]:
    items.sort(key=lambda item: (-item[score], item["index"]))
    return items[:top] if top is not None else items


def _shifted(parts: Sequence[tuple[int, Any]], field: str | None) -> list[dict[str, Any]]:
    items = []
    for offset, answer in parts:
        for item in (answer if field is None else answer[field]):
            items.append({**item, "index": item["index"] + offset})
    return items


def _sum_usage(parts: Sequence[tuple[int, Any]]) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for _, answer in parts:
        for name, value in (answer.get("usage") or {}).items():
            usage[name] = usage.get(name, 0) + value
    return usage


def merge(dialect: str, parts: Sequence[tuple[int, Any]], *, top: int | None) -> Any:
    """One answer from the parts' answers ((offset of the part's first document, its JSON answer))."""
    parts = sorted(parts, key=lambda part: part[0])
    if dialect == "tei":  # a bare array
        return _ranked(_shifted(parts, None), "score", top)
    if dialect == "score":  # in request order, never cut
        first = parts[0][1]
        return {**first, "data": _shifted(parts, "data"), "usage": _sum_usage(parts)}
    field, score = _RESULTS[dialect]
    merged = {**parts[0][1], field: _ranked(_shifted(parts, field), score, top)}
    if "usage" in merged:
        merged["usage"] = _sum_usage(parts)
    if "processing_time_ms" in merged:
        merged["processing_time_ms"] = max(answer["processing_time_ms"] for _, answer in parts)
    return merged
