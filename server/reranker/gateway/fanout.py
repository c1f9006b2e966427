"""Fan-out: a request with many documents split across a fleet's endpoints, answered as one.

A 1,000-document request would otherwise run on one pod while the others idle. Above
RERANKER_GATEWAY_FANOUT_THRESHOLD documents the request is cut into contiguous parts, one per
endpoint (the least loaded, up to RERANKER_GATEWAY_FANOUT_MAX_WIDTH), sent at once, and the
answers merged (merge.py) into exactly what one server would answer. A part that fails fails the
request with that part's own answer (after the usual retries; the other parts are cancelled), but
a part refused as bad input is the whole request's error, asked of one server so its message
names the request's own indices.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from .dialects import Parsed, split
from .directory import Fleet
from .merge import merge
from .upstream import Answer, Upstreams


def width(parsed: Parsed, fleet: Fleet, *, threshold: int, max_width: int) -> int:
    """How many endpoints the request is split across (1: not split)."""
    if parsed.documents <= threshold:
        return 1
    return max(1, min(max_width, len(fleet.endpoints), parsed.documents))


async def fan_out(upstreams: Upstreams, fleet: Fleet, parsed: Parsed, *, whole: bytes, parts: int, path: str,
                  headers: Mapping[str, str], deadline: float, model: str) -> Answer:
    pieces = split(parsed, parts)
    endpoints = upstreams.loads.least_loaded(fleet.endpoints, len(pieces))
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(upstreams.send(fleet, path=path, body=body, headers=headers, pairs=n,
                                                      deadline=deadline, model=model,
                                                      endpoint=endpoints[i % len(endpoints)]))
                     for i, (_, body, n) in enumerate(pieces)]
    except ExceptionGroup as failure:  # one part failed: the others are cancelled, its error is the answer
        raise failure.exceptions[0] from None
    answers = [task.result() for task in tasks]
    failed = next((a for a in answers if a.status != 200), None)
    if failed is not None:
        if 400 <= failed.status < 500 and failed.status != 429:
            # A part's 4xx names the part's own indices ("documents.3"): the whole request to one
            # server gets the error with the request's indices, as a server alone would answer it.
            return await upstreams.send(fleet, path=path, body=whole, headers=headers, pairs=parsed.documents,
                                        deadline=deadline, model=model)
        return failed
    merged = merge(parsed.dialect, [(offset, json.loads(a.body)) for (offset, _, _), a in zip(pieces, answers)],
                   top=parsed.top)
    first = answers[0]
    body = json.dumps(merged, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Answer(status=200, body=body, headers={k: v for k, v in first.headers.items() if k != "x-compute-time"},
                  endpoint=first.endpoint)
