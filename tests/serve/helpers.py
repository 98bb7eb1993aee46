"""Requests and checks shared by the serve-tier tests: the two generation routes, the JSON error shape,
the SSE stream, waiting on the app's state, a Generator held full."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


#: What the serve tier's Generator takes from an ingress: 1 running + 2 queued at its router (the tier's
#: ``max_ongoing_requests`` and ``max_queued_requests``), which is also the door's capacity.
GENERATOR_PLACES = 3


@contextlib.contextmanager
def generator_full(url: str, client: httpx.Client) -> Iterator[Callable[[], bool]]:
    """:data:`GENERATOR_PLACES` long generations (:func:`long_stream`, each on its own connection) fill the
    Generator and the door until the block ends. Yields a check that they still do: call it last inside
    the block, since a long generation that ended early would have let what the block probed through.
    Leaving the block closes them (cancelling them); each must have been answered 200."""
    release = threading.Event()

    def blocker(_: int) -> int:
        with httpx.Client(base_url=url, timeout=120) as c, long_stream(c) as response:
            release.wait(120)  # held (running or queued) until the block ends, then closed
            return response.status_code

    with ThreadPoolExecutor(GENERATOR_PLACES) as pool:
        blockers = [pool.submit(blocker, i) for i in range(GENERATOR_PLACES)]
        try:
            wait_until(lambda: door(client)["in_flight"] == GENERATOR_PLACES, "the long generations never held "
                       "the door", lambda: door(client))  # fmt: skip
            yield lambda: door(client)["in_flight"] == GENERATOR_PLACES
        finally:
            release.set()
        statuses = [b.result() for b in blockers]
        assert statuses == [200] * GENERATOR_PLACES, f"the long generations were answered {statuses}"


def refused_job_image(client: httpx.Client, url: str, app: str) -> float:
    """One image of a job asked of the Ingress (as the jobs' consumer asks) while :func:`generator_full`:
    the Generator's router refuses it, the Ingress sends it again after each pause of its
    ``router_retry_s``, then ends the stream with ``busy`` (the consumer waits and asks again). Returns the
    seconds until ``busy``."""
    from ray import serve

    ingress = serve.get_deployment_handle("Ingress", app)
    body = {"prompt": "a tidy desk setup", "steps": 2, "width": 64, "height": 64, "mix": "ott_3d", "locate": False}
    with generator_full(url, client) as full:
        started = time.monotonic()
        items = list(ingress.options(stream=True).job_image.remote("text2img", body, f"job_{uuid.uuid4().hex[:24]}-0",
                                                                   None, True))  # fmt: skip
        took = time.monotonic() - started
        still_full = full()
    assert still_full, "a long generation ended while the job's image was asked for"
    assert items == [{"type": "busy"}], items
    return took
