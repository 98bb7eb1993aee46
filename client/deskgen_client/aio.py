"""``AsyncDeskgen``: the asyncio client on ``httpx.AsyncClient``, the twin of
:class:`~deskgen_client.sync.Deskgen`. Every request and answer comes from
:class:`~deskgen_client.core.ClientCore`; this module only sends, sleeps and reads lines."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
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
from deskgen_client.jobs import JobEvent, JobStream, job_body
from deskgen_client.protocol import (
    Caption,
    Classification,
    Concepts,
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
)
from deskgen_client.retry import RetryPolicy
from deskgen_client.rules import FeedbackEvent

T = TypeVar("T")


class AsyncDeskgen:
    """A deskgen API client (asyncio).

    >>> async with AsyncDeskgen("http://127.0.0.1:8000") as client:
    ...     result = await client.generate("desk.jpg", mix="ott_3d", seed=42, on_event=print)
    ...     result.save("out.png")
    ...     await client.feedback(result.image_id, "like")

    ``base_url`` defaults to ``$DESKGEN_URL`` then ``http://127.0.0.1:8000``; ``api_key`` to
    ``$DESKGEN_API_KEY``. 429 and 503 answers are retried after their ``Retry-After`` (see
    :class:`~deskgen_client.retry.RetryPolicy`); every other failure raises a typed
    :class:`~deskgen_client.errors.DeskgenError`. ``http_client`` replaces the client's own
    ``httpx.AsyncClient`` (e.g. for proxies or TLS settings; ``timeout`` is then its own, and it is not
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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.core = ClientCore(base_url, api_key=api_key, retry=retry, max_retries=max_retries, headers=headers)
        self._owns_http = http_client is None
        self.http = http_client or httpx.AsyncClient(base_url=self.core.base_url, timeout=timeout)
        #: Asynchronous generation: ``await client.jobs.create(...)``, ``.wait()``, ``.events()``, ``.cancel()``.
        self.jobs = AsyncJobs(self)

    # -- generation ----------------------------------------------------------------------------------

    async def generate(
        self,
        photo: Photo,
        *,
        on_event: Callable[[ProgressEvent], Any] | None = None,
        request_id: str | None = None,
        idempotency_key: str | bool | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """A desk photo -> gate -> captions -> a new desk-setup image. With ``on_event``, the generation is
        streamed and every progress event (classified, captioned, started, each step, located, done) is passed
        to it as it happens (a coroutine function is awaited). ``idempotency_key`` as in the sync client."""
        call = self.core.generate(photo, options, request_id, stream=on_event is not None, idempotency_key=idempotency_key)
        if on_event is None:
            return await self._call(call)
        return await self._follow(call, on_event)

    def stream_generate(
        self, photo: Photo, *, request_id: str | None = None, **options: Unpack[GenerateKwargs]
    ) -> AsyncIterator[ProgressEvent]:
        """The progress events of a generation from a photo, ending with ``Done(result)``."""
        return self._events(self.core.generate(photo, options, request_id, stream=True), GenerationStream())

    async def text2img(
        self,
        prompt: str,
        *,
        on_event: Callable[[ProgressEvent], Any] | None = None,
        request_id: str | None = None,
        idempotency_key: str | bool | None = None,
        **options: Unpack[GenerationKwargs],
    ) -> GenerationResult:
        """A prompt straight to the generator (no gate, no captions); ``on_event`` as for :meth:`generate`."""
        call = self.core.text2img(prompt, options, request_id, stream=on_event is not None,
                                  idempotency_key=idempotency_key)  # fmt: skip
        if on_event is None:
            return await self._call(call)
        return await self._follow(call, on_event)

    def stream_text2img(
        self, prompt: str, *, request_id: str | None = None, **options: Unpack[GenerationKwargs]
    ) -> AsyncIterator[ProgressEvent]:
        """The progress events of a generation from a prompt, ending with ``Done(result)``."""
        return self._events(self.core.text2img(prompt, options, request_id, stream=True), GenerationStream())

    # -- the other routes --------------------------------------------------------------------------

    async def classify(self, photo: Photo) -> Classification:
        return await self._call(self.core.classify(photo))

    async def caption(self, photo: Photo, style: str | None = None) -> Caption:
        return await self._call(self.core.caption(photo, style))

    async def locate(self, image: Photo, products: str | Sequence[str], *, annotate: bool = False) -> LocateResult:
        """Where ``products`` (names, or one comma-separated string) are in any ``image``: per product its
        boxes in pixels and normalised, best first. ``annotate`` also answers a copy with the boxes drawn."""
        return await self._call(self.core.locate(image, products, annotate))

    async def concepts(self) -> Concepts:
        """The concept presets, the weekday schedule and today's concept (``concept="auto"``)."""
        return await self._call(self.core.concepts())

    async def mixes(self) -> Mixes:
        return await self._call(self.core.mixes())

    async def limits(self) -> Limits:
        return await self._call(self.core.limits())

    async def feedback(
        self, image_id: str, event: FeedbackEvent, *, value: float | None = None, user_id: str | None = None
    ) -> FeedbackResult:
        """Record what the user did with an image (``image_id`` = the result's ``request_id``)."""
        return await self._call(self.core.feedback(image_id, event, value, user_id))

    async def experiments(self) -> ExperimentList:
        return await self._call(self.core.experiments())

    async def experiment(self, experiment_id: str) -> dict[str, Any]:
        return await self._call(self.core.experiment(experiment_id))

    async def health(self) -> Health:
        return await self._call(self.core.health())

    async def ready(self) -> Readiness:
        return await self._call(self.core.ready())

    # -- sending -----------------------------------------------------------------------------------

    async def _send(self, request: ApiRequest) -> httpx.Response:
        """The first successful answer, its body not yet read; retried as the core's policy says."""
        retries = 0
        while True:
            built = self.core.build(self.http, request, retries)
            error: DeskgenError
            try:
                response = await self.http.send(built, stream=True)
            except httpx.TransportError as exc:
                error = self.core.transport_failure(exc, built)
            else:
                if request.accepts(response.status_code):
                    return response
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                error = self.core.failure(response)
            delay = self.core.next_delay(request, retries, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            retries += 1

    async def _call(self, call: Call[T]) -> T:
        response = await self._send(call.request)
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise self.core.transport_failure(exc, response.request) from exc
        finally:
            await response.aclose()
        return call.parse(response)

    async def _events(self, call: Call[GenerationResult], stream: GenerationStream) -> AsyncIterator[ProgressEvent]:
        response = await self._send(call.request)
        try:
            stream.request_id = response.headers.get("x-request-id")
            async for line in response.aiter_lines():
                event = stream.feed(line)
                if event is not None:
                    yield event
                    if stream.finished:
                        return
            raise stream.cut_short()
        except httpx.TransportError as exc:
            raise self.core.transport_failure(exc, response.request) from exc
        finally:
            await response.aclose()

    async def _follow(self, call: Call[GenerationResult], on_event: Callable[[ProgressEvent], Any]) -> GenerationResult:
        stream = GenerationStream()
        async for event in self._events(call, stream):
            handled = on_event(event)
            if inspect.isawaitable(handled):
                await handled
        return stream.result

    # -- lifetime ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncDeskgen:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncJobs:
    """``/v1/jobs`` for :class:`AsyncDeskgen`: the twin of :class:`deskgen_client.sync.Jobs`."""

    def __init__(self, client: AsyncDeskgen) -> None:
        self.client = client

    async def create(
        self,
        *,
        text2img: dict[str, Any] | None = None,
        generate: dict[str, Any] | None = None,
        photo: Photo | None = None,
        batch: dict[str, list[Any]] | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] = ("completed",),
        cancel_after_s: float | None = None,
        wait_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> JobAnswer:
        body = job_body(text2img=text2img, generate=generate, photo=photo, batch=batch, webhook=webhook,
                        webhook_events=webhook_events)  # fmt: skip
        call = self.client.core.create_job(body, idempotency_key=idempotency_key, wait_s=wait_s, cancel_after_s=cancel_after_s)
        return await self.client._call(call)

    async def get(self, job_id: str) -> JobAnswer:
        return await self.client._call(self.client.core.job(job_id))

    async def cancel(self, job_id: str) -> JobAnswer:
        return await self.client._call(self.client.core.cancel_job(job_id))

    async def image(self, job_id: str, index: int) -> bytes:
        return await self.client._call(self.client.core.job_image(job_id, index))

    async def events(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[JobEvent]:
        stream = JobStream(last_event_id)
        while True:
            response = await self.client._send(self.client.core.job_events(job_id, stream.after))
            stream.restart()
            try:
                async for line in response.aiter_lines():
                    event = stream.feed(line)
                    if event is not None:
                        yield event
                        if event.final:
                            return
            except httpx.TransportError:
                pass  # cut: resume after the last event seen
            finally:
                await response.aclose()

    async def wait(self, job_id: str, *, timeout_s: float | None = None,
                   on_event: Callable[[JobEvent], Any] | None = None) -> JobAnswer:  # fmt: skip
        async def follow() -> None:
            async for event in self.events(job_id):
                if on_event is not None:
                    handled = on_event(event)
                    if inspect.isawaitable(handled):
                        await handled
                if event.final:
                    return

        await asyncio.wait_for(follow(), timeout_s)
        return await self.get(job_id)
