"""What the sync and the async client share: every request built, every answer read, one retry rule.

:class:`ClientCore` knows the routes; it does no I/O. The clients (:mod:`deskgen_client.sync`,
:mod:`deskgen_client.aio`) only send what it builds and sleep for as long as it says, so the two
cannot drift apart: a route, a header, an error mapping or a retry rule lives here once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypedDict, TypeVar
from urllib.parse import quote

import httpx

from deskgen_client.errors import DeskgenConnectionError, DeskgenError, error_from_body, error_from_response
from deskgen_client.protocol import (
    Caption,
    Classification,
    Concepts,
    Done,
    ExperimentList,
    FeedbackResult,
    GenerationResult,
    Health,
    JobAnswer,
    Limits,
    LocateResult,
    Mixes,
    ProgressEvent,
    Readiness,
    read_event,
)
from deskgen_client.retry import RetryPolicy
from deskgen_client.rules import FEEDBACK_EVENTS, REQUEST_ID_PATTERN, FeedbackEvent
from deskgen_client.sse import SSEParser

log = logging.getLogger("deskgen.client")
T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "DESKGEN_URL"
API_KEY_ENV = "DESKGEN_API_KEY"
#: Generations take seconds to minutes: reads wait long, connecting does not.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: Added to a request's own ``timeout_s`` for its read timeout: the server answers 504 at its deadline,
#: and the client should read that answer rather than give up first.
DEADLINE_MARGIN_S = 30.0
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)

#: A photo: its bytes, a path, or an open binary file.
Photo = bytes | str | os.PathLike[str] | IO[bytes]


class GenerationKwargs(TypedDict, total=False):
    """The keyword arguments of both generation methods: the fields of
    :class:`~deskgen_client.protocol.GenerationKwargs` (a unit test holds the two to the same names).
    Omitted ones take the server's defaults (``GET /v1/limits``)."""

    mix: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str
    user_id: str
    timeout_s: float
    #: A concept preset (``GET /v1/concepts``) or ``auto`` for today's by the schedule.
    concept: str
    #: The products to find in the image (a list, or one comma-separated string); omitted: the objects
    #: the captions (``generate``) or the prompt (``text2img``) name.
    products: Sequence[str]
    #: Find the products at all (default true); ``annotate`` also answers a copy with the boxes drawn.
    locate: bool
    annotate: bool


class GenerateKwargs(GenerationKwargs, total=False):
    """``generate`` also takes a style concept woven into the prompt built from the captions (the fields
    of :class:`~deskgen_client.protocol.GenerateRequest` but the photo)."""

    style: str


@dataclass(frozen=True)
class ApiRequest:
    """One API call, before it is sent (each attempt is built from it afresh).

    ``request_id`` is the id of the first attempt; a retry is a new request to the server and gets its
    own id (see :func:`attempt_request_id`). ``also_ok`` lists non-2xx statuses that are an answer rather
    than an error (``/readyz``'s 503)."""

    method: Literal["GET", "POST"]
    path: str
    request_id: str
    accept: str = "application/json"
    json: dict[str, Any] | None = None
    #: Form fields; a list is the field repeated (``products``).
    data: dict[str, str | list[str]] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    read_timeout_s: float | None = None
    retry: bool = True
    also_ok: tuple[int, ...] = ()
    #: Sent as ``Idempotency-Key`` on every attempt, which then all carry ``request_id`` too (the image id
    #: of whichever attempt runs, so the server records one exposure however many attempts it takes).
    idempotency_key: str | None = None
    headers: dict[str, str] | None = None

    def accepts(self, status: int) -> bool:
        return 200 <= status < 300 or status in self.also_ok


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and how to read its answer into ``T``."""

    request: ApiRequest
    read: Callable[[httpx.Response], T]

    def parse(self, response: httpx.Response) -> T:
        """The typed result; an answer that does not have the documented shape is a DeskgenError too."""
        try:
            return self.read(response)
        except (KeyError, TypeError, ValueError) as exc:
            raise DeskgenError(
                f"{self.request.method} {self.request.path} answered HTTP {response.status_code} with an unexpected "
                f"body ({type(exc).__name__}: {exc}).",
                status=response.status_code, code="unexpected_answer",
                request_id=response.headers.get("x-request-id"),
            ) from exc  # fmt: skip


def attempt_request_id(base: str, attempt: int) -> str:
    """``base`` for the first attempt, ``base.r<n>`` for retry n (shortened to fit 64 characters).

    Each attempt needs its own id: the server records every generation answered under its request id,
    which is the image id — an id reused by a retry would leave the delivered image recorded under the
    first attempt's error, and feedback about it would be refused."""
    if attempt == 0:
        return base
    suffix = f".r{attempt}"
    return base[: 64 - len(suffix)] + suffix


def new_request_id() -> str:
    return uuid.uuid4().hex


def idempotency(key: str | bool | None, stream: bool) -> str | None:
    """The Idempotency-Key of a generation: a given one, a fresh one for ``True``, none for a stream (a
    stream cannot be replayed, so the server refuses a key with one)."""
    if key is None or key is False:
        return None
    if stream:
        raise ValueError("`idempotency_key` works with whole answers, not with a stream (`on_event`).")
    return uuid.uuid4().hex if key is True else key


def read_photo(photo: Photo) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of a photo given as bytes, a path or an open binary file."""
    if isinstance(photo, bytes):
        name, raw = "photo", photo
    elif isinstance(photo, (str, os.PathLike)):
        path = Path(photo)
        name, raw = path.name, path.read_bytes()
    else:
        name, raw = Path(str(getattr(photo, "name", "photo"))).name, photo.read()
    return name, raw, sniff_image_type(raw)


def sniff_image_type(raw: bytes) -> str:
    """The content type of an image from its first bytes (the server decodes by content; this is for
    the multipart part's header and for logs)."""
    if raw.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if raw[:2] == b"BM":
        return "image/bmp"
    return "application/octet-stream"


def product_list(products: str | Sequence[str]) -> list[str]:
    """The product names to send: a list as given, or one comma-separated string split (as the server reads a
    form field). A comma inside a listed name is refused here: on the wire it would silently split the name."""
    if isinstance(products, str):
        return [part for part in (p.strip() for p in products.split(",")) if part]
    names = [str(name) for name in products]
    for i, name in enumerate(names):
        if "," in name:
            raise ValueError(f"`products[{i}]` is {name[:60]!r}: a product name has no commas (they separate names).")
    return names


def form_fields(options: GenerationKwargs | GenerateKwargs) -> dict[str, str | list[str]]:
    """The options as multipart form fields: booleans as ``true``/``false``, the products as the field repeated."""
    fields: dict[str, str | list[str]] = {}
    products = options.get("products")
    if products is not None:
        fields["products"] = product_list(products)
    for key, value in options.items():
        if value is None or key == "products":
            continue
        if isinstance(value, bool):
            fields[key] = "true" if value else "false"
        else:
            fields[key] = str(value)
    return fields


def json_fields(options: GenerationKwargs) -> dict[str, Any]:
    """The options as JSON members (the products always a list)."""
    body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    products = options.get("products")
    if products is not None:
        body["products"] = product_list(products)
    return body


def _json(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict):
        raise TypeError(f"expected a JSON object, got {type(body).__name__}")
    return body


def client_version() -> str:
    try:
        return importlib_metadata.version("deskgen-client")
    except importlib_metadata.PackageNotFoundError:
        return "0"


class GenerationStream:
    """Lines of a generation's ``text/event-stream`` in, typed :data:`ProgressEvent` values out.

    An ``error`` event raises its typed error (with the status it carries; 504 for a deadline); the
    stream is ``finished`` after the ``done`` event; a stream that ends before either was cut short."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.parser = SSEParser()
        self._result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        """The ``done`` event's result; the stream was cut short when there was none."""
        if self._result is None:
            raise self.cut_short()
        return self._result

    def feed(self, line: str) -> ProgressEvent | None:
        sse = self.parser.feed(line)
        if sse is None:
            return None
        try:
            return self._typed(sse.event, json.loads(sse.data))
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise DeskgenError(
                f"the `{sse.event}` event has an unexpected body ({type(exc).__name__}: {exc}).",
                status=200, code="unexpected_answer", request_id=self.request_id,
            ) from exc  # fmt: skip

    def _typed(self, name: str, data: Any) -> ProgressEvent:
        if name == "error":
            status = int(data.pop("status", 504)) if isinstance(data, dict) else 502
            raise error_from_body(status, data if isinstance(data, dict) else {}, request_id=self.request_id)
        event = read_event(name, data)
        if isinstance(event, Done):
            self._result = event.result
        return event

    def cut_short(self) -> DeskgenConnectionError:
        return DeskgenConnectionError(
            "the event stream ended before its `done` event: the connection was closed early.",
            sent=True, code="stream_ended", request_id=self.request_id,
        )  # fmt: skip


class ClientCore:
    """The client's settings (base URL, API key, headers, retry policy) and every route as an
    :class:`ApiRequest` or :class:`Call`. No I/O.

    ``base_url`` defaults to ``$DESKGEN_URL``, then ``http://127.0.0.1:8000``; ``api_key`` to
    ``$DESKGEN_API_KEY`` (sent as ``Authorization: Bearer``; none sent when empty)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        retry = retry or RetryPolicy()
        self.retry = retry if max_retries is None else dataclasses.replace(retry, max_retries=max_retries)
        self.headers = {"User-Agent": f"deskgen-client/{client_version()}", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    # -- sending -----------------------------------------------------------------------------------

    def build(self, http: httpx.Client | httpx.AsyncClient, request: ApiRequest, attempt: int) -> httpx.Request:
        """The httpx request of one attempt (bodies are rebuilt: a multipart stream is read once)."""
        rid = request.request_id if request.idempotency_key else attempt_request_id(request.request_id, attempt)
        headers = {**self.headers, **(request.headers or {}), "Accept": request.accept, "X-Request-Id": rid}
        if request.idempotency_key:
            headers["Idempotency-Key"] = f'"{request.idempotency_key}"'

        timeout = http.timeout
        if request.read_timeout_s is not None:
            timeout = httpx.Timeout(connect=timeout.connect, read=request.read_timeout_s, write=timeout.write,
                                    pool=timeout.pool)  # fmt: skip
        return http.build_request(
            request.method, f"{self.base_url}{request.path}", headers=headers, json=request.json, data=request.data,
            files=request.files, timeout=timeout,
        )

    def failure(self, response: httpx.Response) -> DeskgenError:
        """The typed error of an answer that is not a success (its body already read)."""
        return error_from_response(response.status_code, response.headers, response.content,
                                   request_id=response.request.headers.get("x-request-id"))  # fmt: skip

    def transport_failure(self, exc: httpx.TransportError, request: httpx.Request) -> DeskgenConnectionError:
        # Connecting failed (refused, unreachable, connect timeout) or no pooled connection was free:
        # nothing left this machine, so a retry cannot run the request twice.
        sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        code = "client_timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
        error = DeskgenConnectionError(
            f"{request.method} {request.url}: {type(exc).__name__}: {exc or 'no answer'}",
            sent=sent, code=code, request_id=request.headers.get("x-request-id"),
        )  # fmt: skip
        error.__cause__ = exc
        return error

    def next_delay(self, request: ApiRequest, retries_done: int, error: DeskgenError) -> float | None:
        """How long to wait before retrying ``error``, or ``None`` to raise it (logged either way)."""
        delay = self.retry.delay(retries_done, error, idempotent=request.idempotency_key is not None) if request.retry else None
        if delay is not None:
            log.info("%s %s: %s; retry %d/%d in %.1f s", request.method, request.path, error, retries_done + 1,
                     self.retry.max_retries, delay)  # fmt: skip
        return delay

    # -- the routes --------------------------------------------------------------------------------

    def generate(
        self, photo: Photo, options: GenerateKwargs, request_id: str | None, *, stream: bool,
        idempotency_key: str | bool | None = None,
    ) -> Call[GenerationResult]:
        """``POST /v1/generate``: the photo as a multipart file, the options as form fields."""
        name, raw, content_type = read_photo(photo)
        request = ApiRequest(
            "POST", "/v1/generate", self._request_id(request_id), accept=self._accept(stream),
            data=form_fields(options), files={"image": (name, raw, content_type)},
            read_timeout_s=self._read_timeout(options), idempotency_key=idempotency(idempotency_key, stream),
        )  # fmt: skip
        return Call(request, lambda r: GenerationResult.model_validate(_json(r)))

    def text2img(
        self, prompt: str, options: GenerationKwargs, request_id: str | None, *, stream: bool,
        idempotency_key: str | bool | None = None,
    ) -> Call[GenerationResult]:
        """``POST /v1/text2img``: the prompt and options as JSON."""
        body = {"prompt": prompt, **json_fields(options)}
        request = ApiRequest("POST", "/v1/text2img", self._request_id(request_id), accept=self._accept(stream),
                             json=body, read_timeout_s=self._read_timeout(options),
                             idempotency_key=idempotency(idempotency_key, stream))  # fmt: skip
        return Call(request, lambda r: GenerationResult.model_validate(_json(r)))

    # -- jobs ----------------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None, wait_s: int | None,
                   cancel_after_s: float | None) -> Call[JobAnswer]:  # fmt: skip
        """``POST /v1/jobs`` with a fresh Idempotency-Key (unless given): its retries are one job."""
        headers: dict[str, str] = {}
        if wait_s is not None:
            headers["Prefer"] = f"wait={int(wait_s)}"
        if cancel_after_s is not None:
            headers["Cancel-After"] = f"{cancel_after_s:g}s"
        request = ApiRequest("POST", "/v1/jobs", new_request_id(), json=body, headers=headers,
                             idempotency_key=idempotency_key or uuid.uuid4().hex,
                             read_timeout_s=None if wait_s is None else wait_s + DEADLINE_MARGIN_S)  # fmt: skip
        return Call(request, lambda r: JobAnswer.model_validate(_json(r)))

    def job(self, job_id: str) -> Call[JobAnswer]:
        return Call(ApiRequest("GET", f"/v1/jobs/{quote(job_id, safe='')}", new_request_id()),
                    lambda r: JobAnswer.model_validate(_json(r)))  # fmt: skip

    def cancel_job(self, job_id: str) -> Call[JobAnswer]:
        """``POST /v1/jobs/{id}/cancel``: canceling twice is canceling once, so retrying it is safe."""
        return Call(ApiRequest("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel", new_request_id()),
                    lambda r: JobAnswer.model_validate(_json(r)))  # fmt: skip

    def job_image(self, job_id: str, index: int) -> Call[bytes]:
        request = ApiRequest("GET", f"/v1/jobs/{quote(job_id, safe='')}/images/{int(index)}", new_request_id(),
                             accept="image/png")  # fmt: skip
        return Call(request, lambda r: r.content)

    def job_events(self, job_id: str, last_event_id: str | None = None) -> ApiRequest:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else None
        return ApiRequest("GET", f"/v1/jobs/{quote(job_id, safe='')}/events", new_request_id(),
                          accept="text/event-stream", headers=headers)  # fmt: skip

    def classify(self, photo: Photo) -> Call[Classification]:
        name, raw, content_type = read_photo(photo)
        request = ApiRequest("POST", "/v1/classify", new_request_id(), files={"image": (name, raw, content_type)})
        return Call(request, lambda r: Classification.model_validate(_json(r)))

    def caption(self, photo: Photo, style: str | None) -> Call[Caption]:
        name, raw, content_type = read_photo(photo)
        request = ApiRequest("POST", "/v1/caption", new_request_id(), files={"image": (name, raw, content_type)},
                             data={"style": style} if style is not None else None)  # fmt: skip
        return Call(request, lambda r: Caption.model_validate(_json(r)))

    def locate(self, image: Photo, products: str | Sequence[str], annotate: bool) -> Call[LocateResult]:
        """``POST /v1/locate``: any image as a multipart file, the products as the field repeated. It changes
        nothing on the server, so retrying it is safe."""
        name, raw, content_type = read_photo(image)
        data: dict[str, str | list[str]] = {"products": product_list(products)}
        if annotate:
            data["annotate"] = "true"
        request = ApiRequest("POST", "/v1/locate", new_request_id(), files={"image": (name, raw, content_type)}, data=data)
        return Call(request, lambda r: LocateResult.model_validate(_json(r)))

    def concepts(self) -> Call[Concepts]:
        return Call(ApiRequest("GET", "/v1/concepts", new_request_id()), lambda r: Concepts.model_validate(_json(r)))

    def mixes(self) -> Call[Mixes]:
        return Call(ApiRequest("GET", "/v1/mixes", new_request_id()), lambda r: Mixes.model_validate(_json(r)))

    def limits(self) -> Call[Limits]:
        return Call(ApiRequest("GET", "/v1/limits", new_request_id()), lambda r: Limits.model_validate(_json(r)))

    def feedback(
        self, image_id: str, event: FeedbackEvent, value: float | None, user_id: str | None
    ) -> Call[FeedbackResult]:
        """``POST /v1/feedback``: idempotent per (image, event), so retrying it is safe."""
        if event not in FEEDBACK_EVENTS:
            raise ValueError(f"`event` must be one of {', '.join(FEEDBACK_EVENTS)} but is {event!r}.")
        body: dict[str, Any] = {"image_id": image_id, "event": event}
        if value is not None:
            body["value"] = value
        if user_id is not None:
            body["user_id"] = user_id
        request = ApiRequest("POST", "/v1/feedback", new_request_id(), json=body)
        return Call(request, lambda r: FeedbackResult.model_validate(_json(r)))

    def experiments(self) -> Call[ExperimentList]:
        """``GET /v1/experiments``: ``current`` and every experiment's split, start, exposures, users."""
        return Call(ApiRequest("GET", "/v1/experiments", new_request_id()), lambda r: ExperimentList.model_validate(_json(r)))

    def experiment(self, experiment_id: str) -> Call[dict[str, Any]]:
        """``GET /v1/experiments/{id}``: the per-arm report."""
        path = f"/v1/experiments/{quote(experiment_id, safe='')}"
        return Call(ApiRequest("GET", path, new_request_id()), _json)

    def health(self) -> Call[Health]:
        return Call(ApiRequest("GET", "/healthz", new_request_id(), retry=False), lambda r: Health.model_validate(_json(r)))

    def ready(self) -> Call[Readiness]:
        """``GET /readyz``: its 503 is an answer (which stage is not ready), not an error to retry."""
        request = ApiRequest("GET", "/readyz", new_request_id(), retry=False, also_ok=(503,))
        return Call(request, lambda r: Readiness.model_validate(_json(r)))

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _request_id(given: str | None) -> str:
        if given is None:
            return new_request_id()
        if not REQUEST_ID_RE.fullmatch(given):
            raise ValueError(f"`request_id` must be 1-64 characters of A-Z a-z 0-9 . _ - but is {given[:80]!r}.")
        return given

    @staticmethod
    def _accept(stream: bool) -> str:
        return "text/event-stream" if stream else "application/json"

    @staticmethod
    def _read_timeout(options: GenerationKwargs) -> float | None:
        timeout_s = options.get("timeout_s")
        return float(timeout_s) + DEADLINE_MARGIN_S if timeout_s is not None else None

