"""The door's refusals: no or a wrong API key (401), a key over its rate or its concurrent generations
(429), the generator at capacity (503). They belong to the HTTP layer, so each carries its status and
the headers its answer needs (WWW-Authenticate, Retry-After, RateLimit-*)."""

from __future__ import annotations

from typing import Any

from deskgen.errors import DeskgenError


class DoorRefusal(DeskgenError):
    """A refusal at the HTTP door, with its ``status`` and the ``headers`` of its answer."""

    status: int = 400

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:  # fmt: skip
        super().__init__(message, field=field, **extra)
        self.headers = dict(headers or {})


class Unauthorized(DoorRefusal):
    """API keys are configured and the request has none, or an unknown one (401, with WWW-Authenticate)."""

    status = 401
    code = "unauthorized"


class RateLimited(DoorRefusal):
    """The key is over its request rate (``rate_limited``) or its concurrent generations
    (``concurrency_limited``) (429, with Retry-After and RateLimit-* headers)."""

    status = 429
    code = "rate_limited"


class ConcurrencyLimited(RateLimited):
    """The key has as many generations in flight as it may (429)."""

    code = "concurrency_limited"


class Overloaded(DoorRefusal):
    """The generator is at capacity (503, with Retry-After): refused at the door, before any work."""

    status = 503
    code = "overloaded"
