"""HTTP plumbing of the ingress: the answer format from ``Accept``, server-sent events, a bounded body
read, OpenAPI request bodies for routes that parse their own body, and awaiting a Serve response."""

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from deskgen.errors import InvalidParameter, PayloadTooLarge
from deskgen.limits import MAX_DRAIN_BYTES, MAX_JSON_DEPTH

OutputFormat = Literal["png", "json", "sse"]


def choose_format(accept: str) -> OutputFormat:
    accept = accept.lower()
    if "text/event-stream" in accept:
        return "sse"
    if "application/json" in accept:
        return "json"
    return "png"


def wants_html(request: Request) -> bool:
    """A browser asking for a page (``Accept: text/html``) rather than a client asking for JSON."""
    return "text/html" in request.headers.get("accept", "").lower()


def sse(event: str, data: dict[str, Any] | BaseModel) -> bytes:
    """One server-sent event; a protocol model is written as its JSON (computed fields included)."""
    if isinstance(data, BaseModel):
        return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def read_body(request: Request, limit: int, field: str) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without keeping them. The excess is read
    and discarded up to :data:`~deskgen.limits.MAX_DRAIN_BYTES` first, so the client reads the 413 rather
    than a reset; a client that asked ``Expect: 100-continue`` has sent nothing yet and is answered at once."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if int(declared) <= limit + MAX_DRAIN_BYTES:
            await drain(request, limit + MAX_DRAIN_BYTES)
        raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes but is {declared}.", field=field)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await drain(request, MAX_DRAIN_BYTES)
            raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes.", field=field)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


async def drain(request: Request, budget: int) -> None:
    """Read and drop the rest of the body, at most ``budget`` bytes (nothing when it was all read already,
    the client is waiting for ``100 Continue``, or it went away)."""
    if "100-continue" in request.headers.get("expect", "").lower() or getattr(request, "_stream_consumed", True):
        return
    read = 0
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if read > budget:
                return
    except ClientDisconnect:
        return


def json_object(body: bytes, field: str = "body") -> dict[str, Any]:
    """``body`` parsed as a JSON object, or an InvalidParameter naming ``field`` and the rule broken: not
    JSON, not UTF-8, not an object, a key given twice, or nested deeper than
    :data:`~deskgen.limits.MAX_JSON_DEPTH`."""
    depth = max_nesting(body)
    if depth > MAX_JSON_DEPTH:
        raise InvalidParameter(f"`{field}` nests {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed.", field=field)
    try:
        value = json.loads(body or b"null", object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"`{field}` is not valid JSON: {exc}.", field=field) from None
    if not isinstance(value, dict):
        raise InvalidParameter(f"`{field}` must be a JSON object.", field=field)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidParameter(f"`{key}` appears twice in the JSON object: send each field once.", field=key)
        seen[key] = value
    return seen


def max_nesting(body: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text, outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def image_body(model: type[BaseModel], form_schemas: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The request body of a route that takes a photo: multipart (``image`` a file) or JSON (``image_b64``,
    then required). ``form_schemas`` replace a field's schema in the form (where it travels as text)."""
    schema = model.model_json_schema()
    json_schema = {
        **schema,
        "properties": schema.get("properties", {})
        | {"image_b64": {"type": "string", "format": "byte", "minLength": 4, "description": "the photo, base64"}},
        "required": [*schema.get("required", []), "image_b64"],
    }
    # A form has no null: a field left out is the option's default.
    form_schema = {
        "type": "object",
        "properties": {"image": {"type": "string", "format": "binary"}}
        | {k: (form_schemas or {}).get(k) or _not_null(v) for k, v in schema.get("properties", {}).items() if k != "image_b64"},
        "required": ["image", *[name for name in schema.get("required", []) if name != "image_b64"]],
        "additionalProperties": False,
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form_schema}, "application/json": {"schema": json_schema}},
        }
    }


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) != 1:
        return prop
    return {k: v for k, v in prop.items() if k != "anyOf"} | branches[0]


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def awaitable(call: Any) -> Awaitable[Any]:
    if asyncio.iscoroutine(call) or isinstance(call, asyncio.Future):
        return call  # type: ignore[no-any-return]

    async def wait() -> Any:
        return await call

    return wait()
