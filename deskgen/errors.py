"""Errors the model layer raises on bad input; the ingress maps each to one HTTP status.

Every error carries a stable machine-readable ``code`` and, where one input is at fault, the
``field`` that holds it, so a client can point at the offending value.
"""

from __future__ import annotations

from typing import Any


class DeskgenError(Exception):
    """Base class. ``status`` is the HTTP status the ingress answers with."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        #: HTTP headers the answer carries (``WWW-Authenticate``, ``Retry-After``, ``RateLimit-*``).
        self.headers = dict(headers or {})
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


class InvalidParameter(DeskgenError):
    """A parameter is outside its documented range or malformed (400)."""

    status = 400
    code = "invalid_parameter"


class UnknownMix(DeskgenError):
    """A mix name or an adapter inside an ad-hoc mix does not exist (404)."""

    status = 404
    code = "unknown_mix"


class AdapterUnavailable(DeskgenError):
    """A mix names a LoRA file that is present but cannot be loaded (422): a LyCORIS/DoRA/truncated file,
    an unknown key layout, or layers this model lacks. Carries ``adapter`` and ``reason``; every other mix
    keeps working."""

    status = 422
    code = "adapter_unavailable"

    @classmethod
    def of(cls, adapter: str, reason: str, *, field: str = "mix") -> AdapterUnavailable:
        # The standard (message, **extra) signature is kept: Ray pickles exceptions by their args.
        end = "" if reason.endswith((".", "?", "!")) else "."
        return cls(f"`{field}`: adapter {adapter!r} is unavailable: {reason}{end}", field=field, adapter=adapter, reason=reason)


class PayloadTooLarge(DeskgenError):
    """The upload is larger than the configured byte or pixel limit (413)."""

    status = 413
    code = "payload_too_large"


class NotAnImage(DeskgenError):
    """The upload cannot be decoded as an image (415)."""

    status = 415
    code = "unsupported_media_type"


class NotADeskSetup(DeskgenError):
    """The gate scored the photo below the threshold (422); carries the score."""

    status = 422
    code = "not_a_desk_setup"


class UnknownImage(DeskgenError):
    """Feedback names an image id no exposure was recorded for (404)."""

    status = 404
    code = "unknown_image"


class FeedbackConflict(DeskgenError):
    """Feedback's user id is not the user the image was delivered to (409)."""

    status = 409
    code = "user_mismatch"


class FeedbackForbidden(DeskgenError):
    """Feedback for an image from a caller who may not rate it (403): with API keys configured, only the key
    that generated the image; an image delivered to a ``user_id`` needs that ``user_id``."""

    status = 403
    code = "feedback_forbidden"


class ModelFilesMissing(RuntimeError):
    """A configured model path does not exist. Raised at start-up, never per request."""

    def __init__(self, what: str, path: str, hint: str = "build the tiny models with `make models`") -> None:
        super().__init__(f"{what} not found at {path!r}: {hint}")
        self.path = path


class RecorderBacklog(DeskgenError):
    """The ingress's exposure buffer is full (the experiment store has been unreachable): refused before
    any model runs, so that no delivered image goes unrecorded (503, with Retry-After)."""

    status = 503
    code = "recorder_backlog"


class RecorderUnavailable(DeskgenError):
    """The experiment store did not answer in time; nothing was acknowledged, so a retry is safe (503)."""

    status = 503
    code = "recorder_unavailable"


class LocatorUnavailable(DeskgenError):
    """/v1/locate on a deployment without a product locator (503)."""

    status = 503
    code = "locator_unavailable"


class UnknownExperiment(DeskgenError):
    """No experiment with this id was recorded (404)."""

    status = 404
    code = "unknown_experiment"
