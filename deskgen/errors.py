"""Errors the model layer raises on bad input.

Every error carries a stable machine-readable ``code`` and, where one input is at fault, the ``field``
that holds it, so a client can point at the offending value. The model layer knows no protocol: the
serving layer maps each error class to its HTTP status (deployments/http_errors.py, ``STATUS``).
"""

from __future__ import annotations

from typing import Any


class DeskgenError(Exception):
    """Base class: a refusal of bad input or of work that cannot be done now, with its ``code``."""

    code: str = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


class InvalidParameter(DeskgenError):
    """A parameter is outside its documented range or malformed."""

    code = "invalid_parameter"


class UnknownMix(DeskgenError):
    """A mix name or an adapter inside an ad-hoc mix does not exist."""

    code = "unknown_mix"


class AdapterUnavailable(DeskgenError):
    """A mix names a LoRA file that is present but cannot be loaded: a LyCORIS/DoRA/truncated file,
    an unknown key layout, or layers this model lacks. Carries ``adapter`` and ``reason``; every other mix
    keeps working."""

    code = "adapter_unavailable"

    @classmethod
    def of(cls, adapter: str, reason: str, *, field: str = "mix") -> AdapterUnavailable:
        # The standard (message, **extra) signature is kept: Ray pickles exceptions by their args.
        end = "" if reason.endswith((".", "?", "!")) else "."
        return cls(f"`{field}`: adapter {adapter!r} is unavailable: {reason}{end}", field=field, adapter=adapter, reason=reason)


class PayloadTooLarge(DeskgenError):
    """The upload is larger than the configured byte or pixel limit."""

    code = "payload_too_large"


class NotAnImage(DeskgenError):
    """The upload cannot be decoded as an image."""

    code = "unsupported_media_type"


class NotADeskSetup(DeskgenError):
    """The gate scored the photo below the threshold; carries the score."""

    code = "not_a_desk_setup"


class UnknownImage(DeskgenError):
    """Feedback names an image id no exposure was recorded for."""

    code = "unknown_image"


class FeedbackConflict(DeskgenError):
    """Feedback's user id is not the user the image was delivered to."""

    code = "user_mismatch"


class FeedbackForbidden(DeskgenError):
    """Feedback for an image from a caller who may not rate it: with API keys configured, only the key
    that generated the image; an image delivered to a ``user_id`` needs that ``user_id``."""

    code = "feedback_forbidden"


class ModelFilesMissing(RuntimeError):
    """A configured model path does not exist. Raised at start-up, never per request."""

    def __init__(self, what: str, path: str, hint: str = "build the tiny models with `make models`") -> None:
        super().__init__(f"{what} not found at {path!r}: {hint}")
        self.path = path


class RecorderBacklog(DeskgenError):
    """The ingress's exposure buffer is full (the experiment store has been unreachable): refused before
    any model runs, so that no delivered image goes unrecorded (with a retry hint)."""

    code = "recorder_backlog"


class RecorderUnavailable(DeskgenError):
    """The experiment store did not answer in time; nothing was acknowledged, so a retry is safe."""

    code = "recorder_unavailable"


class LocatorUnavailable(DeskgenError):
    """/v1/locate on a deployment without a product locator."""

    code = "locator_unavailable"


class UnknownExperiment(DeskgenError):
    """No experiment with this id was recorded."""

    code = "unknown_experiment"


class IdempotencyConflict(DeskgenError):
    """The first request with this Idempotency-Key is still running."""

    code = "idempotency_conflict"


class IdempotencyKeyReused(DeskgenError):
    """The Idempotency-Key was used with another request body."""

    code = "idempotency_key_reused"


class UnknownJob(DeskgenError):
    """No job with this id (never created, or past its retention)."""

    code = "unknown_job"


class JobQueueFull(DeskgenError):
    """The job queue holds its configured bound of queued jobs."""

    code = "queue_full"


class JobsUnavailable(DeskgenError):
    """Jobs are not configured on this deployment, or their store (Redis) cannot be reached."""

    code = "jobs_unavailable"
