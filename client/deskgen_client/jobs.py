"""What both clients share about jobs (``/v1/jobs``): the request body and the events of a job's stream."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deskgen_client.protocol.jobs import JobRequest
from deskgen_client.sse import SSEParser

#: The events that end a job's stream: its end, or ``error`` (the server lost its job store mid-stream:
#: the stream ends rather than reconnecting in a loop; the job is read again after it).
FINAL_EVENTS = frozenset({"succeeded", "failed", "canceled", "error"})


@dataclass(frozen=True)
class JobEvent:
    """One event of ``GET /v1/jobs/{id}/events``: queued, started, progress (``image``, ``step``,
    ``steps``), image, retrying, then succeeded, failed or canceled."""

    name: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def final(self) -> bool:
        return self.name in FINAL_EVENTS


class JobStream:
    """A job's event stream, fed one line at a time (both clients); ``after`` is the last event's id, from
    which a stream cut short is resumed."""

    def __init__(self, after: str | None = None) -> None:
        self.after = after
        self.parser = SSEParser()

    def restart(self) -> None:
        self.parser = SSEParser()

    def feed(self, line: str) -> JobEvent | None:
        sse = self.parser.feed(line)
        if sse is None:
            return None
        self.after = sse.id or self.after
        return JobEvent(sse.event, json.loads(sse.data), sse.id)


def job_body(*, text2img: dict[str, Any] | None, generate: dict[str, Any] | None, photo: Any,
             batch: dict[str, list[Any]] | None, webhook: str | None, webhook_events: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """The JSON of ``POST /v1/jobs``, checked by the protocol model before it is sent (a ValueError names
    what is wrong): the photo of a ``generate`` job goes as ``image_b64``."""
    from deskgen_client.core import read_photo

    body: dict[str, Any] = {}
    if text2img is not None:
        body["text2img"] = dict(text2img)
    if generate is not None or photo is not None:
        if photo is None:
            raise ValueError("a `generate` job needs `photo`")
        body["generate"] = {**(generate or {}), "image_b64": base64.b64encode(read_photo(photo)[1]).decode()}
    if batch is not None:
        body["batch"] = dict(batch)
    if webhook is not None:
        body["webhook"] = webhook
        body["webhook_events"] = list(webhook_events)
    return JobRequest.model_validate(body).model_dump(mode="json", exclude_unset=True)
