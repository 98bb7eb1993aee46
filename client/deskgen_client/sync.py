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
        #: Asynchronous generation: ``client.jobs.create(...)``, ``.wait()``, ``.events()``, ``.cancel()``.
        self.jobs = Jobs(self)

    # -- generation ----------------------------------------------------------------------------------

    def generate(
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
        to it as it happens. ``idempotency_key`` (a string, or True for a fresh one) makes every retry safe:
        however many attempts it takes, one image and one exposure."""
        call = self.core.generate(photo, options, request_id, stream=on_event is not None, idempotency_key=idempotency_key)
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
        idempotency_key: str | bool | None = None,
        **options: Unpack[GenerationKwargs],
    ) -> GenerationResult:
        """A prompt straight to the generator (no gate, no captions); ``on_event`` and ``idempotency_key`` as
        for :meth:`generate`."""
        call = self.core.text2img(prompt, options, request_id, stream=on_event is not None,
                                  idempotency_key=idempotency_key)  # fmt: skip
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


class Jobs:
    """``/v1/jobs`` (``Deskgen.jobs``): a generation or a batch queued on the server, followed by polling,
    by its event stream, or by a webhook (verify it with :func:`deskgen_client.webhooks.verify`).

    >>> job = client.jobs.create(text2img={"prompt": "a desk", "mix": "ott_3d"}, batch={"seeds": [1, 2, 3]},
    ...                          webhook="https://backend.example.com/hooks/deskgen")
    >>> job = client.jobs.wait(job.id)
    >>> png = client.jobs.image(job.id, 0)

    ``create`` sends a fresh ``Idempotency-Key`` (or ``idempotency_key``) with every attempt, so its
    retries create one job."""

    def __init__(self, client: Deskgen) -> None:
        self.client = client

    def create(
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
        """Queue a job: ``text2img`` (the body of /v1/text2img) or ``generate`` (its options) with ``photo``;
        ``batch`` varies ``seeds``, ``mixes`` or ``concepts``. ``wait_s``: wait that long on the server
        (``Prefer: wait``) for the finished job."""
        body = job_body(text2img=text2img, generate=generate, photo=photo, batch=batch, webhook=webhook,
                        webhook_events=webhook_events)  # fmt: skip
        call = self.client.core.create_job(body, idempotency_key=idempotency_key, wait_s=wait_s, cancel_after_s=cancel_after_s)
        return self.client._call(call)

    def get(self, job_id: str) -> JobAnswer:
        return self.client._call(self.client.core.job(job_id))

    def cancel(self, job_id: str) -> JobAnswer:
        """A queued job ends at once; a running one at its next denoising step."""
        return self.client._call(self.client.core.cancel_job(job_id))

    def image(self, job_id: str, index: int) -> bytes:
        """Image ``index`` of a finished job, as PNG bytes."""
        return self.client._call(self.client.core.job_image(job_id, index))

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """The job's events from its creation (or after ``last_event_id``) until it ends; a stream cut
        short is resumed where it stopped."""
        stream = JobStream(last_event_id)
        while True:
            response = self.client._send(self.client.core.job_events(job_id, stream.after))
            stream.restart()
            try:
                for line in response.iter_lines():
                    event = stream.feed(line)
                    if event is not None:
                        yield event
                        if event.final:
                            return
            except httpx.TransportError:
                pass  # cut: resume after the last event seen
            finally:
                response.close()

    def wait(self, job_id: str, *, timeout_s: float | None = None,
             on_event: Callable[[JobEvent], Any] | None = None) -> JobAnswer:  # fmt: skip
        """The job once it has ended (following its events); ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
            if event.final:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout_s} s")
        return self.get(job_id)
