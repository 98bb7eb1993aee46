"""One job, start to end: its images one by one, progress, cancellation, results, events and webhooks.

:class:`JobRunner` is what the task consumer runs for each job it receives (and again for a job
redelivered after its consumer died). The generation itself is a callable, :data:`GenerateFn`: in the
service, a call to the Ingress deployment's generation pipeline (the same orchestration as the synchronous
routes: gate, captions, mix, generator, locator, exposure); ``on_step`` is called after each denoising step
and raises :class:`JobCanceled` when the job was canceled or passed its Cancel-After deadline, which stops
the generation at that step.

Claims: a run first claims the job (:meth:`JobStore.claim`) and renews its lease from a heartbeat thread
while it runs. A copy of the job delivered while another runner holds a live lease waits for that runner to
finish (or to die: its lease lapses, and this copy takes over). A failure that is the service's fault (a
replica died, a stage was unavailable: ``retryable``) releases the claim and raises, so the task consumer
retries the job; after ``max_attempts`` claims it ends ``failed`` with that error. A refusal of the request
itself (not a desk, an unknown mix: a 4xx) ends it ``failed`` at once.

Redelivery: image ``k`` of job ``J`` is always ``J-k`` (image id, exposure id, image store key); a runner
that finds result ``k`` recorded skips it, and the exposures table ignores a second insert of an id, so a
job retried after a crash delivers each image and records each exposure once.

Events (the job's stream, ``GET /v1/jobs/{id}/events``): ``started``, ``progress`` (each step), ``image``
(each image done), ``succeeded`` / ``failed`` / ``canceled``. Webhooks (when the job has one) for the
chosen ``webhook_events``: ``start``, ``progress`` (at most one per ``progress_every_s``) and ``completed``
(whatever the end), each signed with the owner's secret and recorded on the job with every attempt; a
``completed`` that is never delivered sets ``webhook_failed``, and the results stay readable.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from deskgen.errors import DeskgenError
from deskgen.imagestore import ImageStore
from deskgen.jobs.store import JobStore
from deskgen.jobs.webhooks import deliver
from deskgen_client.protocol.jobs import JobRequest

log = logging.getLogger(__name__)

#: (kind, body, image id, on_step, owner=API key name) -> (the route's JSON result without image_b64, the PNG)
GenerateFn = Callable[..., tuple[dict[str, Any], bytes]]
Deliver = Callable[..., Any]
#: An exception -> (retryable: the service's fault, the JSON error the job reports).
Describe = Callable[[BaseException], tuple[bool, dict[str, Any]]]


def describe_error(exc: BaseException) -> tuple[bool, dict[str, Any]]:
    """The default :data:`Describe`: a deskgen error is the request's (final); anything else is retryable."""
    if isinstance(exc, DeskgenError):
        return False, exc.to_dict()
    return True, {"code": "internal", "message": f"internal error: {type(exc).__name__}"}


class JobCanceled(Exception):
    """Raised by ``on_step`` to stop a generation whose job was canceled (or timed out)."""


def expand(request: JobRequest) -> list[tuple[str, dict[str, Any]]]:
    """The job's generations: (kind, body) for each image, the batch's option set in each body."""
    kind = "text2img" if request.text2img is not None else "generate"
    body = (request.text2img or request.generate).model_dump(exclude_none=True)  # type: ignore[union-attr]
    batch = request.batch
    if batch is None:
        return [(kind, body)]
    if batch.seeds is not None:
        return [(kind, {**body, "seed": seed}) for seed in batch.seeds]
    if batch.mixes is not None:
        return [(kind, {**body, "mix": mix}) for mix in batch.mixes]
    return [(kind, {**body, "concept": concept}) for concept in batch.concepts or []]


def new_runner_id() -> str:
    return "run_" + secrets.token_hex(6)


def is_connection_error(exc: BaseException) -> bool:
    """Redis unreachable (a restart, a network blip): what a job's bookkeeping may wait out."""
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def image_id_of(job_id: str, index: int) -> str:
    return f"{job_id}-{index}"


class JobRunner:
    """See the module docstring."""

    def __init__(self, jobs: JobStore, images: ImageStore, generate: GenerateFn, *,
                 secret_for: Callable[[str | None], str | None], allow: Sequence[str] = (),
                 deliver_fn: Deliver = deliver, progress_every_s: float = 2.0,
                 image_url: Callable[[str, int], str] = lambda job, k: f"/v1/jobs/{job}/images/{k}",
                 describe: Describe = describe_error, lease_s: float = 30.0, max_attempts: int = 4,
                 poll_s: float = 0.5) -> None:  # fmt: skip
        self.describe = describe
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.jobs = jobs
        self.images = images
        self.generate = generate
        self.secret_for = secret_for
        self.allow = allow
        self.deliver_fn = deliver_fn
        self.progress_every_s = progress_every_s
        self.image_url = image_url

    def run(self, job_id: str, runner: str | None = None) -> str:
        """Run (or finish, after a redelivery) ``job_id``; its status at the end. Raises (for the task
        consumer to retry) when the run failed for the service's fault and attempts remain, and raises a
        Redis connection error as it is (the caller waits for Redis and runs it again as ``runner``)."""
        runner = runner or new_runner_id()
        while True:
            claim = self.jobs.claim(job_id, runner, self.lease_s)
            if claim == "done":
                return self.jobs.get(job_id).status  # canceled while queued, or finished already
            if claim == "run":
                break
            time.sleep(self.poll_s)  # another runner holds it: wait for its end, or for its lease to lapse
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_id, runner, stop), daemon=True,
                                     name=f"lease-{job_id}")  # fmt: skip
        heartbeat.start()
        try:
            return self._run(job_id, runner)
        finally:
            stop.set()
            heartbeat.join()

    def _heartbeat(self, job_id: str, runner: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            try:
                if not self.jobs.renew(job_id, runner, self.lease_s):
                    return
            except Exception as exc:  # Redis briefly away: the next beat tries again
                log.warning("job %s: lease not renewed: %r", job_id, exc)

    def _run(self, job_id: str, runner: str) -> str:
        record = self.jobs.get(job_id, with_request=True)
        request = JobRequest.model_validate(record.request)
        items = expand(request)
        self.jobs.event(job_id, "started", {"status": "running", "images": len(items)})
        self._notify(job_id, "start", {"id": job_id, "status": "running"})
        done = {r["index"] for r in record.results}
        last_progress = [0.0]
        for index, (kind, body) in enumerate(items):
            if index in done:
                continue

            def on_step(step: int, steps: int, index: int = index) -> None:
                # Progress is news, not state: a Redis that is briefly away (a restart) skips it, and the
                # generation goes on; the results written after it are what must not be lost.
                progress = {"image": index, "images": len(items), "step": step, "steps": steps}
                try:
                    self.jobs.progress(job_id, progress)
                    self.jobs.event(job_id, "progress", progress)
                    if time.monotonic() - last_progress[0] >= self.progress_every_s:
                        last_progress[0] = time.monotonic()
                        self._notify(job_id, "progress", {"id": job_id, **progress})
                    canceled = self.jobs.canceled(job_id)
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    log.warning("job %s: progress of step %d not recorded: %r", job_id, step, exc)
                    return
                if canceled:
                    raise JobCanceled(job_id)

            if self.jobs.canceled(job_id):
                return self._canceled(job_id)
            image_id = image_id_of(job_id, index)
            try:
                result, png = self.generate(kind, body, image_id, on_step, owner=record.owner)
            except JobCanceled:
                return self._canceled(job_id)
            except Exception as exc:
                if is_connection_error(exc):
                    raise
                retryable, described = self.describe(exc)
                if retryable and self.jobs.get(job_id).attempts < self.max_attempts:
                    log.warning("job %s image %d failed (attempt %d of %d), retried: %r", job_id, index,
                                self.jobs.get(job_id).attempts, self.max_attempts, exc)  # fmt: skip
                    self.jobs.event(job_id, "retrying", {"image": index, "error": described})
                    self.jobs.release(job_id, runner)
                    raise
                error = {"index": index, **described}
                self.jobs.finish(job_id, "failed", error)
                self.jobs.event(job_id, "failed", error)
                self._notify(job_id, "completed", {"id": job_id, "status": "failed", "error": error})
                return "failed"
            self.images.put(image_id, png)
            entry = {"image_id": image_id, "url": self.image_url(job_id, index), "result": result}
            self.jobs.add_result(job_id, index, entry)
            self.jobs.event(job_id, "image", {"index": index, "image_id": image_id, "url": entry["url"]})
        self.jobs.finish(job_id, "succeeded")
        final = self.jobs.get(job_id)
        self.jobs.event(job_id, "succeeded", {"status": "succeeded", "images": len(final.results)})
        self._notify(job_id, "completed", {"id": job_id, "status": "succeeded",
                                           "images": [{k: r[k] for k in ("index", "image_id", "url")} for r in final.results]})  # fmt: skip
        return "succeeded"

    def _canceled(self, job_id: str) -> str:
        self.jobs.transition(job_id, {"running"}, "canceled")
        self.jobs.event(job_id, "canceled", {"status": "canceled"})
        self._notify(job_id, "completed", {"id": job_id, "status": "canceled"})
        return "canceled"

    def _notify(self, job_id: str, event: str, payload: dict[str, Any]) -> None:
        """Post ``event`` to the job's webhook if it asked for it; record the delivery on the job."""
        record = self.jobs.get(job_id)
        hook = record.webhook
        if not hook or event not in hook.get("events", []):
            return
        secret = self.secret_for(record.owner)
        if secret is None:
            log.warning("job %s: no webhook secret for owner %r; %s not sent", job_id, record.owner, event)
            return
        webhook_id = f"{job_id}.{event}" if event != "progress" else f"{job_id}.progress.{payload.get('image')}.{payload.get('step')}"
        delivery = self.deliver_fn(hook["url"], secret, webhook_id, f"job.{event}", payload, allow=self.allow)
        self.jobs.record_delivery(job_id, delivery.as_dict())
        if event == "completed" and not delivery.delivered:
            self.jobs.mark_webhook_failed(job_id)
