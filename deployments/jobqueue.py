"""The ingress's side of the jobs: their records, idempotency keys and the queue, all in Redis.

:class:`JobQueue` is built from ``args.jobs`` (deskgen.jobs.settings) when the ingress starts; its
Redis client, job store, idempotency store and the task producer (Ray Serve's asynchronous inference:
the same Celery adapter the consumer deployment reads from) are made on first use, so an ingress
starts, and its synchronous routes work, while Redis is still starting or away. Every call is
synchronous (Redis, Celery): the routes run them in a thread (:meth:`JobQueue.call`), and a Redis that
cannot be reached is answered 503 ``jobs_unavailable``.

The headers a job submission may carry are parsed here too: ``Prefer: wait=N`` (RFC 7240) and
``Cancel-After`` (a duration from the job's creation: ``90``, ``90s``, ``5m``, ``1h30m``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

from deskgen.errors import InvalidParameter, JobsUnavailable
from deskgen.jobs.idempotency import IdempotencyStore
from deskgen.jobs.settings import JobsSettings
from deskgen.jobs.store import JobRecord, JobStore
from deskgen_client.protocol.jobs import JobAnswer

T = TypeVar("T")

#: The longest ``Prefer: wait`` honoured (a longer one waits this long).
MAX_WAIT_S = 60
#: The longest ``Cancel-After``.
MAX_CANCEL_AFTER_S = 24 * 3600
TASK_NAME = "run_job"

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")
_WAIT = re.compile(r"^wait\s*=\s*(\d{1,6})$", re.IGNORECASE)


def parse_cancel_after(header: str | None) -> float | None:
    """Seconds from a ``Cancel-After`` header (``90``, ``90s``, ``5m``, ``1h30m``); None when absent."""
    if header is None:
        return None
    text = header.strip().lower()
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groups()):
        raise InvalidParameter(f"`Cancel-After` must be a duration such as 90, 90s, 5m or 1h30m, not {header[:50]!r}.",
                               field="Cancel-After")  # fmt: skip
    hours, minutes, seconds = match.groups()
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if not 0 < total <= MAX_CANCEL_AFTER_S:
        raise InvalidParameter(f"`Cancel-After` must be more than 0 s and at most {MAX_CANCEL_AFTER_S} s, not {total:g} s.",
                               field="Cancel-After")  # fmt: skip
    return total


def parse_prefer_wait(header: str | None) -> int | None:
    """The ``wait`` preference of a ``Prefer`` header in seconds (at most :data:`MAX_WAIT_S`); None when it
    names none. Other preferences (``respond-async``) are accepted and ignored."""
    if header is None:
        return None
    wait: int | None = None
    for part in header.split(","):
        token = part.split(";")[0].strip()
        if not token or token.lower() == "respond-async":
            continue
        match = _WAIT.fullmatch(token)
        if match is None:
            raise InvalidParameter(f"`Prefer` must be wait=N (whole seconds) or respond-async, not {header[:60]!r}.",
                                   field="Prefer")  # fmt: skip
        wait = min(int(match.group(1)), MAX_WAIT_S)
    return wait


def job_answer(record: JobRecord, retention_s: float) -> JobAnswer:
    """A job record as the API shows it."""
    hook = record.webhook or {}
    return JobAnswer.model_validate({
        "id": record.id, "status": record.status, "position": record.position, "progress": record.progress,
        "images": record.results, "error": record.error, "webhook": hook.get("url"),
        "webhook_events": hook.get("events", []), "webhook_failed": record.webhook_failed,
        "deliveries": record.deliveries, "created_at": record.created_at, "attempts": record.attempts,
        "cancel_after": record.cancel_after,
        "expires_at": None if record.finished_at is None else record.finished_at + retention_s,
    })  # fmt: skip


class JobQueue:
    """See the module docstring."""

    def __init__(self, settings: JobsSettings) -> None:
        self.settings = settings
        self._redis: Any = None
        self._producer: Any = None
        self._store: JobStore | None = None
        self._keys: IdempotencyStore | None = None

    @property
    def redis(self) -> Any:
        if self._redis is None:
            self._redis = self.settings.redis()
        return self._redis

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.redis, retention_s=self.settings.retention_s, max_queued=self.settings.max_queued)
        return self._store

    @property
    def keys(self) -> IdempotencyStore:
        if self._keys is None:
            self._keys = IdempotencyStore(self.redis, retention_s=self.settings.idempotency_retention_h * 3600,
                                          lease_s=self.settings.idempotency_lease_s)  # fmt: skip
        return self._keys

    def enqueue(self, job_id: str) -> None:
        """Hand the job to the task consumers (its task id is the job id)."""
        if self._producer is None:
            from ray.serve.task_consumer import instantiate_adapter_from_config

            self._producer = instantiate_adapter_from_config(self.settings.task_processor_config())
        self._producer.enqueue_task_sync(TASK_NAME, args=[job_id], task_id=job_id)

    def answer(self, job_id: str, owner: str | None) -> JobAnswer:
        """The job as its owner sees it; another key's job is unknown (404), as a missing one is."""
        record = self.store.get(job_id)
        if record.owner != owner:
            from deskgen.errors import UnknownJob

            raise UnknownJob(f"`id`: no job {job_id!r} (never created, or past its retention).", field="id")
        return job_answer(record, self.settings.retention_s)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a thread; Redis or the broker unreachable -> 503 ``jobs_unavailable``."""
        import kombu.exceptions
        import redis

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
            raise JobsUnavailable(f"the job store (Redis) cannot be reached ({type(exc).__name__}): retry.") from None
