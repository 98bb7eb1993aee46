"""Requests and checks shared by the serve-tier tests: the two generation routes, the JSON error shape,
the SSE stream, waiting on the app's state."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
from PIL import Image


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def generate(client: httpx.Client, photo: bytes, accept: str | None = None, **fields: Any) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    data = {k: str(v) for k, v in fields.items()}
    return client.post("/v1/generate", files={"image": ("desk.jpg", photo, "image/jpeg")}, data=data, headers=headers)


def text2img(client: httpx.Client, accept: str | None = None, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    headers = {**(headers or {}), **({"Accept": accept} if accept else {})}
    return client.post("/v1/text2img", json={"prompt": "a tidy desk setup", "steps": 1, **body}, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return dict(error)


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def wait_until(check: Any, what: str, state: Any = None, timeout_s: float = 60) -> None:
    """Poll ``check`` until true; past ``timeout_s`` fail naming ``what`` and, if given, ``state()``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s: {state() if state else ''}")
        time.sleep(0.2)


def door(client: httpx.Client) -> dict[str, Any]:
    """The ingress door's admission state (capacity, limit, in_flight, shed, ...) from /healthz."""
    return dict(client.get("/healthz").json()["admission"])


@contextlib.contextmanager
def long_stream(client: httpx.Client, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
    """A generation that holds its place for long (150 steps at 512 px, cut at 30 s): an SSE stream whose
    first event has arrived. Leaving the block closes it, which cancels the generation."""
    body = {"prompt": "desk", "steps": 150, "width": 512, "height": 512, "timeout_s": 30}
    with client.stream("POST", "/v1/text2img", json=body, headers=(headers or {}) | {"Accept": "text/event-stream"}) as response:
        lines = response.iter_lines()  # kept until the block ends: dropping it would close the stream
        if response.status_code == 200:
            next(lines)
        yield response
