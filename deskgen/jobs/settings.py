"""The jobs' settings (``args.jobs`` in serve_config.yaml): where Redis is, the queue and its bound, how
long results and idempotency keys are kept, retries and redelivery, webhook delivery bounds.

One source for every part that needs them: the ingress (submit, status, idempotency keys), the task
consumer deployment (Ray Serve's asynchronous inference: :meth:`JobsSettings.task_processor_config`), the
job runner (webhooks) and the tests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: ``make serve``'s Redis (``python -m deskgen.tools.redis start --dir build/redis --port 6380``).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6380/0"


class WebhookSettings(BaseModel):
    """At-least-once delivery of one event: exponential backoff (``base_delay_s`` x 2^n), bounded in
    attempts and in time."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(6, ge=1, le=20)
    base_delay_s: float = Field(1.0, gt=0, le=60)
    max_total_s: float = Field(120.0, gt=0, le=3600)
    timeout_s: float = Field(10.0, gt=0, le=60, description="one attempt's HTTP timeout")


class JobsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis: the broker (Celery) and the jobs' records")
    queue_name: str = Field("deskgen-jobs", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_queued: int = Field(100, ge=1, le=100_000, description="queued jobs; past it POST /v1/jobs answers 503")
    retention_h: float = Field(24.0, gt=0, le=24 * 90, description="finished jobs' records and images are kept this long")
    idempotency_retention_h: float = Field(24.0, gt=0, le=24 * 30, description="how long an Idempotency-Key replays")
    idempotency_lease_s: float = Field(
        30.0, ge=1, le=3600, description="a key whose request runs is held this long, renewed while it runs: an "
        "ingress replica that dies mid-request frees its keys for the client's retry within this long",
    )  # fmt: skip
    max_retries: int = Field(3, ge=0, le=20, description="a job whose run fails for the service's fault is retried")
    redelivery_s: int = Field(
        300, ge=5, le=24 * 3600,
        description="a job taken by a consumer that died is handed to another after this long (the broker's "
        "visibility timeout); a live consumer renews its claim on the job while it runs",
    )  # fmt: skip
    lease_s: float = Field(30.0, ge=2, le=3600, description="a running job's claim, renewed every few seconds")
    progress_every_s: float = Field(2.0, ge=0, le=600, description="at most one `progress` webhook per this long")
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    @property
    def retention_s(self) -> float:
        return self.retention_h * 3600

    def redis(self) -> Any:
        """A synchronous Redis client (call from a thread, never from an event loop)."""
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                    health_check_interval=30)  # fmt: skip

    def task_processor_config(self) -> Any:
        """Ray Serve's asynchronous inference config: Celery over this Redis, acknowledged after the run
        (a consumer that dies mid-job has it redelivered after ``redelivery_s``), retried ``max_retries``
        times, then parked in ``<queue>-failed``."""
        from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

        adapter = CeleryAdapterConfig(
            broker_url=self.redis_url, backend_url=self.redis_url,
            broker_transport_options={"visibility_timeout": self.redelivery_s},
            app_custom_config={"worker_prefetch_multiplier": 1, "result_expires": int(self.retention_s),
                               "broker_connection_retry_on_startup": True,
                               "worker_hijack_root_logger": False, "worker_redirect_stdouts": False},
        )  # fmt: skip
        return TaskProcessorConfig(queue_name=self.queue_name, adapter_config=adapter, max_retries=self.max_retries,
                                   failed_task_queue_name=f"{self.queue_name}-failed")  # fmt: skip
