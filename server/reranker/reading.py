"""Reading a request body the way every rerank route does: JSON, its limits, its dialect, its schema.

The server's routes and the gateway (reranker.gateway) both read bodies with these functions, so a
body the gateway refuses is refused with the very status and message the server would give, and a
body it forwards is read by the server as the gateway read it. Kept free of the server's runtime
(only the errors and pydantic), because the gateway image has neither PyTorch nor NumPy.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from .errors import ClientGone, InvalidJSON, InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)

#: Bodies larger than this are parsed in a worker thread, off the event loop.
PARSE_OFF_LOOP_BYTES = 256 * 1024

#: JSON deeper than this is refused: no dialect nests beyond a few levels (a v1 document object's fields).
MAX_JSON_DEPTH = 32


def check_tree(data: Any) -> None:
    """Refuse what parses as JSON but cannot be served: lone surrogates, absurd nesting."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise InvalidRequest(f"{path or 'body'}: not valid Unicode (lone surrogate "
                                         f"{value[exc.start]!r} at character {exc.start})") from None
            continue
        if depth >= MAX_JSON_DEPTH and isinstance(value, (dict, list)):
            raise InvalidRequest(f"{path or 'body'}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii():
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        raise InvalidRequest(f"{path or 'body'}: a key is not valid Unicode (lone surrogate)") from None
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1) for i, item in enumerate(value))


def parse(body: bytes) -> Any:
    """The body as JSON, checked by `check_tree` (400 if it is not JSON, 422 if it cannot be served)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJSON(f"request body is JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_tree(data)
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _is_type_tag(part: object) -> bool:
    """pydantic puts union member names ('str', 'dict[str,any]') in error locations; users don't need them."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "(" in part)


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`, or a 422 naming each bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
            problems.append(f"{loc or 'body'}: {err['msg']}")
        raise InvalidRequest("; ".join(dict.fromkeys(problems))) from None


def dialect_of(data: Any) -> str:
    """Which dialect a body posted to /rerank speaks, from its own fields (docs/api.md):
    `texts` is TEI's; `top_k` is the native one's; otherwise `model` or `top_n` is vLLM's form
    (LiteLLM's `hosted_vllm`, vLLM's docs); a body with none of these is native."""
    if not isinstance(data, dict):
        return "native"
    if "texts" in data:
        return "tei"
    if "top_k" in data:
        return "native"
    if "model" in data or "top_n" in data:
        return "vllm"
    return "native"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, whether declared or streamed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} (RERANKER_MAX_BODY_BYTES)")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes (RERANKER_MAX_BODY_BYTES)")
    except ClientDisconnect:
        raise ClientGone() from None  # gone mid-upload: nothing to answer
    return bytes(body)


async def parse_body(body: bytes) -> Any:
    """`parse`, in a worker thread for large bodies (the event loop keeps serving meanwhile)."""
    if len(body) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, body)
    return parse(body)
