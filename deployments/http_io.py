"""HTTP plumbing of the ingress: the answer format from ``Accept``, server-sent events, a bounded body
read, OpenAPI request bodies for routes that parse their own body, and awaiting a Serve response."""

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel

from deskgen.errors import PayloadTooLarge

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


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def read_body(request: Request, limit: int, field: str) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes but is {declared}.", field=field)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes.", field=field)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


def image_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    form_schema = {
        "type": "object",
        "properties": {"image": {"type": "string", "format": "binary"}}
        | {k: v for k, v in schema.get("properties", {}).items() if k != "image_b64"},
        "required": ["image"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form_schema}, "application/json": {"schema": schema}},
        }
    }


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def awaitable(call: Any) -> Awaitable[Any]:
    if asyncio.iscoroutine(call) or isinstance(call, asyncio.Future):
        return call  # type: ignore[no-any-return]

    async def wait() -> Any:
        return await call

    return wait()
