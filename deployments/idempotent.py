"""``Idempotency-Key`` on the POST routes that make something (``/v1/jobs``, ``/v1/text2img``,
``/v1/generate``): the rules are deskgen/jobs/idempotency.py's (IETF draft); this is the HTTP side.

A request with a key claims it before anything runs (per API key, route and key); a replay of a finished
one gets the first answer again, byte for byte, with ``Idempotent-Replayed: true`` (same image or job id:
no second generation and no second exposure). An error answer is kept like any other, except a 5xx: the
service's fault releases the key, so the client's retry runs afresh, and records no exposure (the client's
retries of a keyed request carry the same ``X-Request-Id``, the image id, so the attempt that delivers the
image records its exposure once). An ingress replica that dies mid-request stops renewing its keys; they
lapse after ``jobs.idempotency_lease_s`` and the retry runs. Streamed answers (``Accept:
text/event-stream``) cannot be replayed, so a key with one is refused (400 naming the header).
"""

# No `from __future__ import annotations`: kept like the route modules that import it.

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from deployments.access import api_key_of
from deployments.http_errors import error_for, json_error, unwrap
from deployments.http_io import choose_format, read_body
from deskgen.errors import InvalidParameter, JobsUnavailable
from deskgen.jobs.idempotency import StoredAnswer, parse_key
from deskgen.limits import MAX_FORM_FIELDS, MAX_FORM_FILES

#: The headers of an answer that describe it, kept with it for a replay.
KEPT_HEADERS = ("content-type", "location", "retry-after", "server-timing", "preference-applied")


async def idempotent(routes: Any, request: Request, route: str, run: Callable[[], Awaitable[Response]]) -> Response:
    """Answer ``request`` with ``run()``, or with the stored answer of the first request with its key."""
    key = parse_key(request.headers.get("idempotency-key"))
    if key is None:
        return await run()
    if choose_format(request.headers.get("accept", "")) == "sse":
        raise InvalidParameter("`Idempotency-Key` works with PNG or JSON answers; a stream (Accept: "
                               "text/event-stream) cannot be replayed.", field="Idempotency-Key")  # fmt: skip
    queue = routes.job_queue
    if queue is None:
        raise JobsUnavailable("`Idempotency-Key` needs the jobs' store (args.jobs), which this deployment has not.")
    config = routes.config
    body = await fingerprinted(request, await read_body(request, config.max_upload_bytes * 4 // 3 + 64 * 1024, "body"))
    scope = api_key_of(request) or "-"
    claim = await queue.call(queue.keys.claim, scope, route, key, body)
    if claim.state == "replay":
        assert claim.answer is not None
        return Response(claim.answer.body, status_code=claim.answer.status,
                        headers={**claim.answer.headers, "Idempotent-Replayed": "true"})  # fmt: skip
    renewing = asyncio.get_running_loop().create_task(_renew(queue, scope, route, key))
    try:
        response = await run()
    except Exception as exc:
        if error_for(unwrap(exc), config.retry_after_s)[0] >= 500:
            # The key is released for the client's retry, which reuses the image id: its outcome is the
            # exposure's (the store keeps an image id's first outcome, which must be the one delivered).
            request.state.exposure = None
        response = json_error(request, exc, config.retry_after_s)
    finally:
        renewing.cancel()
    kept = {name: value for name, value in response.headers.items() if name in KEPT_HEADERS or name.startswith("x-deskgen-")}
    answer = StoredAnswer(response.status_code, kept, bytes(response.body))
    try:
        await queue.call(queue.keys.complete, scope, route, key, body, answer)
    except JobsUnavailable:
        pass  # the answer goes out; its key stays "running" until its lease ends, then runs afresh
    return response


async def _renew(queue: Any, scope: str, route: str, key: str) -> None:
    """Hold the key while its request runs (a dead replica's keys lapse after the lease)."""
    while True:
        await asyncio.sleep(queue.keys.lease_s / 3)
        try:
            await queue.call(queue.keys.renew, scope, route, key)
        except JobsUnavailable as exc:
            logging.getLogger("ray.serve").warning("Idempotency-Key lease not renewed: %s", exc)


async def fingerprinted(request: Request, body: bytes) -> bytes:
    """What a key's fingerprint is taken of: the request's content, not its encoding. A multipart form's
    boundary is random per request (a client's retry sends another), so a form is its fields in order and
    each file's SHA-256; a JSON body is its canonical JSON (key order and spacing do not matter). A body that
    does not parse is itself (the route then refuses it)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "multipart/form-data":
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
            parts: list[list[str]] = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    content = await value.read()
                    await value.seek(0)  # the route reads it again
                    parts.append([key, "file", hashlib.sha256(content).hexdigest()])
                else:
                    parts.append([key, "text", value])
            return json.dumps(parts).encode()
        if content_type == "application/json":
            return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except Exception:
        return body
    return body
