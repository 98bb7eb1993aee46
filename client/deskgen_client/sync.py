"""``Deskgen``: the blocking client on ``httpx.Client``. Every request and answer comes from
:class:`~deskgen_client.core.ClientCore`; this module only sends, sleeps and reads lines."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from deskgen_client.core import (
    DEFAULT_TIMEOUT,
    ApiRequest,
    Call,
    ClientCore,
    GenerateKwargs,
    GenerationKwargs,
    GenerationStream,
    Photo,
)
from deskgen_client.errors import DeskgenError
from deskgen_client.protocol import (
    Caption,
    Classification,
    Concepts,
    ExperimentList,
    FeedbackResult,
    GenerationResult,
    Health,
    Limits,
    LocateResult,
    Mixes,
    ProgressEvent,
    Readiness,
)
from deskgen_client.retry import RetryPolicy
from deskgen_client.rules import FeedbackEvent

T = TypeVar("T")


class Deskgen:
    """A deskgen API client (blocking).

    >>> with Deskgen("http://127.0.0.1:8000") as client:
    ...     result = client.generate("desk.jpg", mix="ott_3d", seed=42, on_event=print)
    ...     result.save("out.png")
    ...     client.feedback(result.image_id, "like")

    ``base_url`` defaults to ``$DESKGEN_URL`` then ``http://127.0.0.1:8000``; ``api_key`` to
    ``$DESKGEN_API_KEY``. 429 and 503 answers are retried after their ``Retry-After`` (see
    :class:`~deskgen_client.retry.RetryPolicy`); every other failure raises a typed
    :class:`~deskgen_client.errors.DeskgenError`. ``http_client`` replaces the client's own
    ``httpx.Client`` (e.g. for proxies or TLS settings; ``timeout`` is then its own, and it is not
    closed here)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        headers: dict[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.core = ClientCore(base_url, api_key=api_key, retry=retry, max_retries=max_retries, headers=headers)
        self._owns_http = http_client is None
        self.http = http_client or httpx.Client(base_url=self.core.base_url, timeout=timeout)

    # -- generation ----------------------------------------------------------------------------------

    def generate(
        self,
        photo: Photo,
        *,
        on_event: Callable[[ProgressEvent], Any] | None = None,
        request_id: str | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """A desk photo -> gate -> captions -> a new desk-setup image. With ``on_event``, the generation is
        streamed and every progress event (classified, captioned, started, each step, located, done) is passed
        to it as it happens."""
        call = self.core.generate(photo, options, request_id, stream=on_event is not None)
        if on_event is None:
            return self._call(call)
        return self._follow(call, on_event)

    def stream_generate(
        self, photo: Photo, *, request_id: str | None = None, **options: Unpack[GenerateKwargs]
    ) -> Iterator[ProgressEvent]:
        """The progress events of a generation from a photo, ending with ``Done(result)``."""
        return self._events(self.core.generate(photo, options, request_id, stream=True), GenerationStream())

    def text2img(
        self,
        prompt: str,
        *,
        on_event: Callable[[ProgressEvent], Any] | None = None,
        request_id: str | None = None,
        **options: Unpack[GenerationKwargs],
    ) -> GenerationResult:
        """A prompt straight to the generator (no gate, no captions); ``on_event`` as for :meth:`generate`."""
        call = self.core.text2img(prompt, options, request_id, stream=on_event is not None)
        if on_event is None:
            return self._call(call)
        return self._follow(call, on_event)

    def stream_text2img(
        self, prompt: str, *, request_id: str | None = None, **options: Unpack[GenerationKwargs]
    ) -> Iterator[ProgressEvent]:
        """The progress events of a generation from a prompt, ending with ``Done(result)``."""
        return self._events(self.core.text2img(prompt, options, request_id, stream=True), GenerationStream())

    # -- the other routes --------------------------------------------------------------------------

    def classify(self, photo: Photo) -> Classification:
        return self._call(self.core.classify(photo))

    def caption(self, photo: Photo, style: str | None = None) -> Caption:
        return self._call(self.core.caption(photo, style))

    def locate(self, image: Photo, products: str | Sequence[str], *, annotate: bool = False) -> LocateResult:
        """Where ``products`` (names, or one comma-separated string) are in any ``image``: per product its
        boxes in pixels and normalised, best first. ``annotate`` also answers a copy with the boxes drawn."""
        return self._call(self.core.locate(image, products, annotate))

    def concepts(self) -> Concepts:
        """The concept presets, the weekday schedule and today's concept (``concept="auto"``)."""
        return self._call(self.core.concepts())

    def mixes(self) -> Mixes:
        return self._call(self.core.mixes())

    def limits(self) -> Limits:
        return self._call(self.core.limits())

    def feedback(
        self, image_id: str, event: FeedbackEvent, *, value: float | None = None, user_id: str | None = None
    ) -> FeedbackResult:
        """Record what the user did with an image (``image_id`` = the result's ``request_id``)."""
        return self._call(self.core.feedback(image_id, event, value, user_id))

    def experiments(self) -> ExperimentList:
        return self._call(self.core.experiments())

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self._call(self.core.experiment(experiment_id))

    def health(self) -> Health:
        return self._call(self.core.health())

    def ready(self) -> Readiness:
        return self._call(self.core.ready())

    # -- sending -----------------------------------------------------------------------------------

    def _send(self, request: ApiRequest) -> httpx.Response:
        """The first successful answer, its body not yet read; retried as the core's policy says."""
        retries = 0
        while True:
            built = self.core.build(self.http, request, retries)
            error: DeskgenError
            try:
                response = self.http.send(built, stream=True)
            except httpx.TransportError as exc:
                error = self.core.transport_failure(exc, built)
            else:
                if request.accepts(response.status_code):
                    return response
                try:
                    response.read()
                finally:
                    response.close()
                error = self.core.failure(response)
            delay = self.core.next_delay(request, retries, error)
            if delay is None:
                raise error
            time.sleep(delay)
            retries += 1

    def _call(self, call: Call[T]) -> T:
        response = self._send(call.request)
        try:
            response.read()
        except httpx.TransportError as exc:
            raise self.core.transport_failure(exc, response.request) from exc
        finally:
            response.close()
        return call.parse(response)

    def _events(self, call: Call[GenerationResult], stream: GenerationStream) -> Iterator[ProgressEvent]:
        response = self._send(call.request)
        try:
            stream.request_id = response.headers.get("x-request-id")
            for line in response.iter_lines():
                event = stream.feed(line)
                if event is not None:
                    yield event
                    if stream.finished:
                        return
            raise stream.cut_short()
        except httpx.TransportError as exc:
            raise self.core.transport_failure(exc, response.request) from exc
        finally:
            response.close()

    def _follow(self, call: Call[GenerationResult], on_event: Callable[[ProgressEvent], Any]) -> GenerationResult:
        stream = GenerationStream()
        for event in self._events(call, stream):
            on_event(event)
        return stream.result

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Deskgen:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
