"""Jobs: asynchronous generation for integrators (issue 25). ``POST /v1/jobs`` checks a job (as the
synchronous routes check their requests), records it and queues it for the task consumer deployment
(deployments/consumer.py, Ray Serve's asynchronous inference over Redis), which runs each of its images
through :meth:`JobRoutes.job_image`: this ingress's own generation pipeline, the one the synchronous routes
use. The rest reads the job's record (deskgen/jobs/store.py) and the image store.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.access import api_key_of
from deployments.app import api
from deployments.http_errors import error_for, json_errors, unwrap
from deployments.http_io import json_body
from deployments.idempotent import idempotent
from deployments.jobqueue import JobQueue, parse_cancel_after, parse_prefer_wait
from deployments.openapi import JOB_ANSWERS, answers
from deployments.pipeline import Caller
from deployments.render import json_result
from deployments.routes.base import RoutesBase
from deskgen.contracts import GeneratedImage, Step
from deskgen.errors import InvalidParameter, JobsUnavailable, UnknownJob
from deskgen.jobs.runner import expand
from deskgen.jobs.store import TERMINAL
from deskgen.jobs.webhooks import check_target
from deskgen_client.protocol import GenerateRequest, Text2ImgRequest
from deskgen_client.protocol.jobs import JobAnswer, JobRequest

#: How often a waiting request (``Prefer: wait``) or an event stream looks for news (Redis blocks this long).
POLL_MS = 500


def job_body() -> dict[str, Any]:
    """The request body of ``POST /v1/jobs``: :class:`JobRequest`, whose ``generate.image_b64`` is required
    base64 (as /v1/generate's JSON body says)."""
    extra = json_body(JobRequest)
    generate = extra["requestBody"]["content"]["application/json"]["schema"]["$defs"]["GenerateRequest"]
    generate["properties"]["image_b64"] = {"type": "string", "format": "byte", "minLength": 4,
                                           "description": "the photo, base64"}  # fmt: skip
    generate["required"] = [*generate.get("required", []), "image_b64"]
    return extra


class JobRoutes(RoutesBase):
    """``/v1/jobs``, ``/v1/jobs/{job_id}``, ``.../events``, ``.../cancel``, ``.../images/{index}``."""

    def jobs(self) -> JobQueue:
        if self.job_queue is None:
            raise JobsUnavailable("jobs are not configured on this deployment (args.jobs in serve_config.yaml).")
        return self.job_queue

    @api.post("/v1/jobs", status_code=202, openapi_extra=job_body(),
              responses=answers(400, 404, 409, 413, 415, 422, 503, ok=JOB_ANSWERS))  # fmt: skip
    @json_errors
    async def create_job(self, request: Request) -> Response:
        """Queue a generation (the body of /v1/text2img or /v1/generate, photo as `image_b64`) or a batch
        varying seeds, mixes or concepts. 202 with the job and `Location`; with `Prefer: wait=N`, 200 with
        the finished job when it ends within N s. `Cancel-After` sets a deadline from creation;
        `Idempotency-Key` makes a retry return the first answer; `webhook` receives signed events."""
        return await idempotent(self, request, "jobs", lambda: self._create_job(request))

    async def _create_job(self, request: Request) -> Response:
        queue = self.jobs()
        wait = parse_prefer_wait(request.headers.get("prefer"))
        cancel_after = parse_cancel_after(request.headers.get("cancel-after"))
        job, _ = await self.parse(request, JobRequest, image="none")
        owner = api_key_of(request)
        webhook = None
        if job.webhook is not None:
            await asyncio.to_thread(check_target, job.webhook, self.config.webhook_allow)
            if self.config.webhook_secret_of(owner) is None:
                raise InvalidParameter("`webhook`: no webhook signing secret is configured for "
                                       f"{'API key ' + repr(owner) if owner else 'the open API'} "
                                       "(`webhook_secret` in the Ingress user_config).", field="webhook")  # fmt: skip
            webhook = {"url": job.webhook, "events": list(dict.fromkeys(job.webhook_events))}
        await self.check_job(job)
        record = job.model_dump(mode="json", exclude_none=True)
        job_id = await queue.call(queue.store.create, record, owner=owner, cancel_after_s=cancel_after, webhook=webhook)
        try:
            await queue.call(queue.enqueue, job_id)
        except Exception:
            await queue.call(queue.store.finish_unqueued, job_id, {"code": "jobs_unavailable", "message": "not queued"})
            raise
        answer = await queue.call(queue.answer, job_id, owner)
        headers = {"Location": f"/v1/jobs/{job_id}"}
        if wait:
            answer = await self.wait_for(queue, job_id, owner, wait)
            headers["Preference-Applied"] = f"wait={wait}"
        status = 200 if answer.status in TERMINAL else 202
        return JSONResponse(answer.model_dump(mode="json"), status_code=status, headers=headers)

    async def check_job(self, job: JobRequest) -> None:
        """Every image's request as the synchronous route would check it (limits, concept, mix, photo)."""
        photo: bytes | None = None
        if job.generate is not None:
            try:
                photo = base64.b64decode(job.generate.image_b64 or "", validate=True)
            except ValueError:
                raise InvalidParameter("`generate.image_b64` is not valid base64.", field="generate.image_b64") from None
        for index, (kind, body) in enumerate(expand(job)):
            model = Text2ImgRequest if kind == "text2img" else GenerateRequest
            await self.pipeline.check(model.model_validate(body), photo if index == 0 else None)  # decoded once

    async def wait_for(self, queue: JobQueue, job_id: str, owner: str | None, wait_s: float) -> JobAnswer:
        """The job once it ends, or as it is after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        after = "0"
        while True:
            answer = await queue.call(queue.answer, job_id, owner)
            left = deadline - time.monotonic()
            if answer.status in TERMINAL or left <= 0:
                return answer
            events = await queue.call(queue.store.events, job_id, after, int(min(left, POLL_MS / 1000) * 1000) or 1)
            if events:
                after = events[-1][0]

    @api.get("/v1/jobs/{job_id}", responses=answers(404, 503, ok={200: {"description": "the job", "model": JobAnswer}}))
    @json_errors
    async def get_job(self, request: Request, job_id: str) -> JSONResponse:
        """A job: queued (with its position), running (with its progress), succeeded (each image's JSON
        result and URL), failed (the JSON error) or canceled; its webhook deliveries."""
        queue = self.jobs()
        answer = await queue.call(queue.answer, check_job_id(job_id), api_key_of(request))
        return JSONResponse(answer.model_dump(mode="json"))

    @api.post("/v1/jobs/{job_id}/cancel", responses=answers(404, 503, ok={200: {"description": "the job after the cancel", "model": JobAnswer}}))
    @json_errors
    async def cancel_job(self, request: Request, job_id: str) -> JSONResponse:
        """Cancel a job: a queued one at once; a running one stops at its next denoising step (its status
        turns `canceled` then). A finished job is left as it is."""
        queue = self.jobs()
        owner = api_key_of(request)
        await queue.call(queue.answer, check_job_id(job_id), owner)  # 404 for another key's job
        await queue.call(queue.store.cancel, job_id)
        answer = await queue.call(queue.answer, job_id, owner)
        return JSONResponse(answer.model_dump(mode="json"))

    @api.get("/v1/jobs/{job_id}/images/{index}",
             responses=answers(400, 404, 503, ok={200: {"description": "the image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}))  # fmt: skip
    @json_errors
    async def job_image_png(self, request: Request, job_id: str, index: str) -> Response:
        """Image `index` (from 0) of a job, as PNG; 404 while it is not made, or after the retention."""
        queue = self.jobs()
        answer = await queue.call(queue.answer, check_job_id(job_id), api_key_of(request))
        if not index.isdigit() or len(index) > 4:
            raise InvalidParameter(f"`index` must be an image's index (0, 1, ...), not {index[:20]!r}.", field="index")
        image = next((i for i in answer.images if i.index == int(index)), None)
        png = None if image is None or self.pipeline.images is None else await asyncio.to_thread(self.pipeline.images.get, image.image_id)
        if png is None:
            raise UnknownJob(f"`index`: job {job_id} has no image {index} (not made yet, or past its retention).", field="index")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @api.get("/v1/jobs/{job_id}/events",
             responses=answers(400, 404, 503, ok={200: {"description": "the job's events", "content": {"text/event-stream": {"schema": {"type": "string", "description": "queued, started, progress (each step), image (each image), retrying, then succeeded, failed or canceled"}}}}}))  # fmt: skip
    @json_errors
    async def job_events(self, request: Request, job_id: str) -> StreamingResponse:
        """The job's events as server-sent events, from its creation (or after `Last-Event-ID`) until it
        ends: queued, started, progress, image, retrying, then succeeded, failed or canceled."""
        queue = self.jobs()
        await queue.call(queue.answer, check_job_id(job_id), api_key_of(request))
        after = request.headers.get("last-event-id", "0")
        if after != "0" and not all(part.isdigit() for part in after.split("-", 1)):
            raise InvalidParameter("`Last-Event-ID` must be an event id of this stream (e.g. 1733300000000-0).", field="Last-Event-ID")
        return StreamingResponse(self._job_events(request, queue, job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def _job_events(self, request: Request, queue: JobQueue, job_id: str, after: str) -> AsyncIterator[bytes]:
        while not await request.is_disconnected():
            try:
                events = await queue.call(queue.store.events, job_id, after, POLL_MS)
            except JobsUnavailable as exc:
                yield f"event: error\ndata: {json.dumps({'error': exc.to_dict()})}\n\n".encode()
                return
            for event_id, name, data in events:
                after = event_id
                yield f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
                if name in TERMINAL:
                    return
            if not events:
                yield b": keep-alive\n\n"

    # -- what the task consumer calls (deployments/consumer.py), not routes -----------------------

    async def job_image(self, kind: str, body: dict[str, Any], image_id: str, owner: str | None,
                        last_attempt: bool = True) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """One image of a job through this ingress's generation pipeline, as a stream: ``progress`` after
        each denoising step, then ``image`` (the JSON result without ``image_b64``, and the PNG). The image
        is delivered as an exposure of the experiment under ``image_id`` (``<job>-<k>``: once, even when
        the job runs again). A failure is raised to the consumer and settled on the exposure when it is the
        job's outcome: the request's fault (4xx), its deadline (504), or the service's on the last attempt
        (a failure the job retries records nothing: the exposure store keeps the first outcome of an image
        id, which must be the one its client gets). A generator at capacity ends the stream with ``busy``
        (nothing recorded): the consumer waits and sends the image again."""
        caller = Caller(image_id, owner, None)
        if kind == "text2img":
            run = await self.pipeline.prepare_text(Text2ImgRequest.model_validate(body), caller)
        else:
            form = GenerateRequest.model_validate(body)
            run = await self.pipeline.prepare_photo(form, base64.b64decode(form.image_b64 or ""), caller)
        try:
            async for event in self.pipeline.events(run):
                if isinstance(event, Step):
                    yield {"type": "progress", "step": event.step, "steps": event.total}
                elif isinstance(event, GeneratedImage):
                    result = json_result(event, run.answer(), image_id)
                    result.pop("image_b64", None)
                    yield {"type": "image", "result": result, "png": event.png}
        except asyncio.CancelledError:
            run.exposure.settle("canceled", 499)
            raise
        except Exception as exc:
            status, error, _ = error_for(unwrap(exc), self.config.retry_after_s)
            code = error["error"]["code"]
            if code == "overloaded":
                # The generator is at capacity: the consumer waits and asks again. Not raised, so that
                # Serve does not log a routine wait as a failed request with its traceback.
                yield {"type": "busy"}
                return
            if status < 500 or status == 504 or last_attempt:
                run.exposure.settle(code, status)
            raise

    async def webhook_view(self, owner: str | None) -> dict[str, Any]:
        """What a job's webhooks need from the live config: the allow-list and the owner's secret."""
        return {"allow": list(self.config.webhook_allow), "secret": self.config.webhook_secret_of(owner)}


def check_job_id(job_id: str) -> str:
    if not (job_id.startswith("job_") and len(job_id) == 28 and all(c in "0123456789abcdef" for c in job_id[4:])):
        raise UnknownJob(f"`id`: no job {job_id[:60]!r} (job ids look like job_ and 24 hex digits).", field="id")
    return job_id
