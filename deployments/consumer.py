"""The task consumer deployment: jobs run here, on Ray Serve's asynchronous inference (``@task_consumer``,
Celery over Redis; alpha in Ray 2.60).

Each replica's Celery worker takes ``run_job`` tasks from the queue (``max_ongoing_requests`` at a time,
one job per thread; a task is acknowledged when it ends, so a replica that dies mid-job has it
redelivered after ``jobs.redelivery_s``). A job runs in :class:`deskgen.jobs.runner.JobRunner`, whose
images are made by the Ingress deployment's generation pipeline (:meth:`JobRoutes.job_image`, called by
handle as a stream: the same gate, captions, mix, generator, locator and exposure as a synchronous
request, and a cancel stops the stream, so the generation stops at its next step). The webhooks' allow-list
and secrets come from the Ingress's live config (one source for them).

The deployment is made by :func:`job_consumer` when the app is built, because Serve's decorator takes
the task processor config (the Redis URL of ``args.jobs``) then.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from deployments.http_errors import error_for, unwrap
from deskgen.imagestore import ImageStoreSettings
from deskgen.jobs.runner import JobCanceled, JobRunner, is_connection_error, new_runner_id
from deskgen.jobs.settings import JobsSettings
from deskgen.jobs.store import JobStore
from deskgen.jobs.webhooks import deliver

log = logging.getLogger("ray.serve")

DEPLOYMENT = "JobConsumer"
#: How long a job waits before asking a generator at capacity again.
BUSY_WAIT_S = 0.5


def describe(exc: BaseException) -> tuple[bool, dict[str, Any]]:
    """A failed image: retryable when the service is at fault (a 5xx other than the request's own deadline,
    504), final when the request is (4xx: not a desk, an unknown mix, ...); the error as the API gives it."""
    status, body, _ = error_for(unwrap(exc), 5)
    return status >= 500 and status != 504, body["error"]


class JobConsumerReplica:
    """See the module docstring."""

    def __init__(self, jobs: dict[str, Any], image_store: dict[str, Any], ingress: str = "Ingress") -> None:
        self.settings = JobsSettings.model_validate(jobs)
        self.store = JobStore(self.settings.redis(), retention_s=self.settings.retention_s,
                              max_queued=self.settings.max_queued)  # fmt: skip
        images = ImageStoreSettings.model_validate(image_store).build()
        assert images is not None, "jobs keep their images in the image store: args.image_store.dir is required"
        self.images = images
        self.ingress_name = ingress
        self._ingress: Any = None

    def ingress(self) -> Any:
        if self._ingress is None:
            app = serve.get_replica_context().app_name
            self._ingress = serve.get_deployment_handle(self.ingress_name, app_name=app)
        return self._ingress

    def info(self) -> dict[str, Any]:
        """This replica's process (the fault tests kill it)."""
        import os

        return {"pid": os.getpid()}

    @task_handler(name="run_job")
    def run_job(self, job_id: str) -> str:
        """One job (Celery's thread); raises for a retry when the service failed it (deskgen.jobs.runner)."""
        self._wait_for_redis(time.monotonic() + self.settings.redelivery_s)
        owner = self.store.get(job_id).owner
        view = self.ingress().webhook_view.remote(owner).result()
        hooks = self.settings.webhooks
        runner = JobRunner(
            self.store, self.images, self.generate, secret_for=lambda _owner: view["secret"], allow=view["allow"],
            deliver_fn=functools.partial(deliver, max_attempts=hooks.max_attempts, base_delay_s=hooks.base_delay_s,
                                         max_total_s=hooks.max_total_s, timeout_s=hooks.timeout_s),
            progress_every_s=self.settings.progress_every_s, describe=describe, lease_s=self.settings.lease_s,
            max_attempts=self.settings.max_retries + 1,
        )  # fmt: skip
        runner_id = new_runner_id()
        deadline = time.monotonic() + self.settings.redelivery_s
        while True:
            try:
                status = runner.run(job_id, runner_id)
                break
            except Exception as exc:
                # Redis went away mid-job (a restart): wait for it, then go on where the job stands. Past
                # the redelivery time the broker hands the job to another consumer anyway.
                if not is_connection_error(exc) or time.monotonic() > deadline:
                    raise
                log.warning("job %s: Redis unreachable (%r); waiting for it", job_id, exc)
                self._wait_for_redis(deadline)
        log.info("job %s: %s", job_id, status)
        return status

    def _wait_for_redis(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self.store.redis.ping()
                return
            except Exception:
                time.sleep(0.5)

    def generate(self, kind: str, body: dict[str, Any], image_id: str, on_step: Any, owner: str | None = None) -> tuple[dict[str, Any], bytes]:
        """One image through the Ingress's pipeline. A generator at capacity (503 ``overloaded``) is waited
        for: a job queues, it does not fail or spend a retry on a busy service."""
        job_id = image_id.rsplit("-", 1)[0]
        while True:
            last = self.store.get(job_id).attempts >= self.settings.max_retries + 1
            try:
                made = self._generate(kind, body, image_id, on_step, owner, last)
            except JobCanceled:
                raise
            except Exception as exc:
                if describe(exc)[1].get("code") != "overloaded":
                    raise
                made = None
            if made is not None:
                return made
            if self.store.canceled(job_id):
                raise JobCanceled(job_id)
            time.sleep(BUSY_WAIT_S)

    def _generate(self, kind: str, body: dict[str, Any], image_id: str, on_step: Any, owner: str | None,
                  last: bool) -> tuple[dict[str, Any], bytes] | None:  # fmt: skip
        """The image's JSON result and PNG; None when the generator was at capacity (``busy``). ``on_step``
        may raise JobCanceled, which cancels the stream (and the generation at its next step)."""
        stream = self.ingress().options(stream=True).job_image.remote(kind, body, image_id, owner, last)
        try:
            for item in stream:
                if item["type"] == "progress":
                    on_step(item["step"], item["steps"])
                elif item["type"] == "image":
                    return item["result"], item["png"]
                elif item["type"] == "busy":
                    return None
        except JobCanceled:
            stream.cancel()
            raise
        raise RuntimeError(f"the ingress ended image {image_id} without an image")


def job_consumer(settings: JobsSettings) -> Any:
    """The ``JobConsumer`` deployment for ``settings`` (resources and replicas: serve_config.yaml)."""
    consumer = task_consumer(task_processor_config=settings.task_processor_config())(JobConsumerReplica)
    return serve.deployment(name=DEPLOYMENT, max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.25})(consumer)
