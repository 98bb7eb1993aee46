"""Job records in Redis: status, queue position, progress, results, events, cancellation, retention.

One hash per job (``deskgen:job:<id>``) holds its request, owner (API key name), status and what it
produced; a sorted set orders the queued jobs (``ZRANK`` is a job's position); a Redis stream per job
(``deskgen:job:<id>:events``) carries its events in order, for ``GET /v1/jobs/{id}/events`` and for
webhooks. Status changes are atomic (a Lua script checks the current status): a job is canceled or
started once, and a job redelivered after its consumer died finds itself ``running`` and takes over.

    queued --claim--> running --finish--> succeeded | failed
      |                  |
      +----cancel--------+--> canceled   (a running job stops at its next denoising step)

Running a job takes a **claim** (:meth:`JobStore.claim`): the runner's id and a lease that it renews while it
runs. A job redelivered while its first runner still holds a live lease waits (the broker keeps its message
unacknowledged), and takes the job over only when the lease lapses (the first runner died); every claim
counts an attempt, so a job that keeps failing for the service's fault ends ``failed`` after its retries.

A finished job's records expire after ``retention_s``; its images live in the image store under
``<job id>-<k>`` (bounded in size and time, :mod:`deskgen.imagestore`).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from deskgen.errors import JobQueueFull, UnknownJob

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
PREFIX = "deskgen:job:"
QUEUED = "deskgen:jobs:queued"
EVENTS_MAXLEN = 2000

#: KEYS[1] the job hash, KEYS[2] the queued set; ARGV: the job id, the allowed current statuses (comma
#: separated), the new status, now, the retention for terminal states. Returns the old status or false.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == current then allowed = true end end
if not allowed then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'updated_at', ARGV[4])
if ARGV[3] ~= 'queued' then redis.call('ZREM', KEYS[2], ARGV[1]) end
if ARGV[3] == 'succeeded' or ARGV[3] == 'failed' or ARGV[3] == 'canceled' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[1] .. ':events', ARGV[5])
end
return current
"""


#: KEYS[1] the job hash, KEYS[2] the queued set; ARGV: job id, runner id, now, lease seconds. Returns
#: "run" (claimed; an attempt counted unless the runner held it already), "busy" (another runner's lease is live) or "done" (nothing to run).
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'status', 'runner', 'lease_until')
local status, runner, lease = h[1], h[2], tonumber(h[3] or '0') or 0
if not status or (status ~= 'queued' and status ~= 'running') then return 'done' end
if status == 'running' and runner ~= ARGV[2] and lease > tonumber(ARGV[3]) then return 'busy' end
if runner ~= ARGV[2] then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'status', 'running', 'runner', ARGV[2], 'updated_at', ARGV[3],
           'lease_until', tostring(tonumber(ARGV[3]) + tonumber(ARGV[4])))
redis.call('ZREM', KEYS[2], ARGV[1])
return 'run'
"""

#: KEYS[1] the job hash; ARGV: runner id, now, lease seconds. Extends the lease if the runner holds it.
_RENEW = """
if redis.call('HGET', KEYS[1], 'runner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', tostring(tonumber(ARGV[2]) + tonumber(ARGV[3])))
return 1
"""


#: The hash's fields but ``request`` (see :meth:`JobStore.get`).
RECORD_FIELDS = ["owner", "status", "created_at", "cancel_after", "progress", "results", "error", "webhook",
                 "deliveries", "cancel_requested", "webhook_failed", "attempts", "finished_at"]  # fmt: skip


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str | None
    status: JobStatus
    #: Empty unless read ``with_request``.
    request: dict[str, Any]
    created_at: float
    cancel_after: float | None
    position: int | None
    progress: dict[str, Any] | None
    results: list[dict[str, Any]]
    error: dict[str, Any] | None
    webhook: dict[str, Any] | None
    deliveries: list[dict[str, Any]]
    cancel_requested: bool
    webhook_failed: bool = False
    attempts: int = 0
    finished_at: float | None = None


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


class JobStore:
    """See the module docstring. ``redis`` is a synchronous ``redis.Redis`` client."""

    def __init__(self, redis: Any, *, retention_s: float = 24 * 3600, max_queued: int = 100) -> None:
        self.redis = redis
        self.retention_s = int(retention_s)
        self.max_queued = max_queued
        self._transition = redis.register_script(_TRANSITION)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)

    @staticmethod
    def key(job_id: str) -> str:
        return PREFIX + job_id

    def create(self, request: dict[str, Any], *, owner: str | None, cancel_after_s: float | None = None,
               webhook: dict[str, Any] | None = None, job_id: str | None = None) -> str:  # fmt: skip
        """Record a queued job; JobQueueFull when ``max_queued`` jobs wait already."""
        if self.redis.zcard(QUEUED) >= self.max_queued:
            raise JobQueueFull(f"the job queue holds {self.max_queued} jobs, its bound; retry later.")
        job_id = job_id or new_job_id()
        now = time.time()
        fields = {"id": job_id, "owner": owner or "", "status": "queued", "request": json.dumps(request),
                  "created_at": repr(now), "updated_at": repr(now),
                  "cancel_after": "" if cancel_after_s is None else repr(now + cancel_after_s),
                  "results": "[]", "deliveries": "[]", "webhook": json.dumps(webhook) if webhook else ""}  # fmt: skip
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(job_id), mapping=fields)
            pipe.zadd(QUEUED, {job_id: now})
            pipe.execute()
        self.event(job_id, "queued", {"status": "queued"})
        return job_id

    def get(self, job_id: str, *, with_request: bool = False) -> JobRecord:
        """The job's record; its ``request`` (which may hold a photo of megabytes) only ``with_request``:
        status reads, which are frequent, leave it in Redis."""
        fields = [*RECORD_FIELDS, "request"] if with_request else RECORD_FIELDS
        values = self.redis.hmget(self.key(job_id), fields)
        raw = {name: value.decode() for name, value in zip(fields, values, strict=True) if value is not None}
        if not raw:
            raise UnknownJob(f"`id`: no job {job_id!r} (never created, or past its retention).", field="id")
        position = self.redis.zrank(QUEUED, job_id) if raw["status"] == "queued" else None
        return JobRecord(
            id=job_id, owner=raw["owner"] or None, status=raw["status"],  # type: ignore[arg-type]
            request=json.loads(raw["request"]) if "request" in raw else {}, created_at=float(raw["created_at"]),
            cancel_after=float(raw["cancel_after"]) if raw["cancel_after"] else None,
            position=None if position is None else int(position),
            progress=json.loads(raw["progress"]) if raw.get("progress") else None,
            results=json.loads(raw["results"]), error=json.loads(raw["error"]) if raw.get("error") else None,
            webhook=json.loads(raw["webhook"]) if raw["webhook"] else None, deliveries=json.loads(raw["deliveries"]),
            cancel_requested=raw.get("cancel_requested") == "1", webhook_failed=raw.get("webhook_failed") == "1",
            attempts=int(raw.get("attempts") or 0),
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
        )  # fmt: skip

    def transition(self, job_id: str, allowed: set[str], status: JobStatus) -> str | None:
        """Move ``job_id`` to ``status`` if its status is one of ``allowed``; the old status, or None."""
        old = self._transition(keys=[self.key(job_id), QUEUED],
                               args=[job_id, ",".join(sorted(allowed)), status, repr(time.time()), self.retention_s])  # fmt: skip
        return old.decode() if old else None

    def claim(self, job_id: str, runner: str, lease_s: float) -> Literal["run", "busy", "done"]:
        """Take ``job_id`` for ``runner`` (queued, or running under a lapsed lease or this runner's own):
        "run"; another runner's lease is live: "busy"; canceled, finished or gone: "done"."""
        answer = self._claim(keys=[self.key(job_id), QUEUED], args=[job_id, runner, repr(time.time()), lease_s])
        return (answer.decode() if isinstance(answer, bytes) else answer)  # type: ignore[return-value]

    def renew(self, job_id: str, runner: str, lease_s: float) -> bool:
        """Extend ``runner``'s lease on ``job_id``; False when it no longer holds it."""
        return bool(self._renew(keys=[self.key(job_id)], args=[runner, repr(time.time()), lease_s]))

    def release(self, job_id: str, runner: str) -> None:
        """Give the lease up (the run failed and will be retried at once)."""
        self._renew(keys=[self.key(job_id)], args=[runner, "0", "0"])

    def progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.redis.hset(self.key(job_id), "progress", json.dumps(progress))

    def add_result(self, job_id: str, index: int, result: dict[str, Any]) -> None:
        """Record image ``index``'s result once (a redelivered job that made it again replaces it)."""
        record = self.get(job_id)
        results = [r for r in record.results if r.get("index") != index] + [{**result, "index": index}]
        self.redis.hset(self.key(job_id), "results", json.dumps(sorted(results, key=lambda r: r["index"])))

    def finish(self, job_id: str, status: Literal["succeeded", "failed"], error: dict[str, Any] | None = None) -> bool:
        if error is not None:
            self.redis.hset(self.key(job_id), "error", json.dumps(error))
        return self.transition(job_id, {"running"}, status) is not None

    def finish_unqueued(self, job_id: str, error: dict[str, Any]) -> None:
        """A job recorded but never handed to the broker: failed at once (nothing will run it)."""
        self.redis.hset(self.key(job_id), "error", json.dumps(error))
        self.transition(job_id, {"queued"}, "failed")

    def cancel(self, job_id: str) -> str:
        """Cancel: a queued job at once; a running one is asked to stop (at its next step). The status after."""
        if self.transition(job_id, {"queued"}, "canceled") is not None:
            self.event(job_id, "canceled", {"status": "canceled"})
            return "canceled"
        record = self.get(job_id)
        if record.status == "running":
            self.redis.hset(self.key(job_id), "cancel_requested", "1")
        return record.status

    def canceled(self, job_id: str) -> bool:
        """Whether a running job should stop now: asked to, or past its Cancel-After deadline."""
        raw = self.redis.hmget(self.key(job_id), ["cancel_requested", "cancel_after"])
        asked, deadline = (v.decode() if v else "" for v in raw)
        return asked == "1" or bool(deadline and time.time() > float(deadline))

    def record_delivery(self, job_id: str, delivery: dict[str, Any]) -> None:
        record = self.get(job_id)
        self.redis.hset(self.key(job_id), "deliveries", json.dumps([*record.deliveries, delivery]))

    def mark_webhook_failed(self, job_id: str) -> None:
        """The job's ``completed`` webhook was never delivered (its results stay readable)."""
        self.redis.hset(self.key(job_id), "webhook_failed", "1")

    def event(self, job_id: str, name: str, data: dict[str, Any]) -> str:
        """Append an event to the job's stream; its stream id."""
        stream = self.key(job_id) + ":events"
        entry = self.redis.xadd(stream, {"event": name, "data": json.dumps(data)}, maxlen=EVENTS_MAXLEN, approximate=True)
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """Events after stream id ``after`` (waiting up to ``block_ms`` for one): (id, name, data)."""
        stream = self.key(job_id) + ":events"
        answer = self.redis.xread({stream: after}, block=block_ms, count=100) or []
        return [(eid.decode(), f[b"event"].decode(), json.loads(f[b"data"])) for _, entries in answer for eid, f in entries]
