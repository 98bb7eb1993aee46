"""The door's refusals: no or a wrong API key (401), a key over its rate or its concurrent generations
(429), the generator at capacity (503). Each carries the headers its answer needs (WWW-Authenticate,
Retry-After, RateLimit-*)."""

from __future__ import annotations

from deskgen.errors import DeskgenError


class Unauthorized(DeskgenError):
    """API keys are configured and the request has none, or an unknown one (401, with WWW-Authenticate)."""

    status = 401
    code = "unauthorized"


class RateLimited(DeskgenError):
    """The key is over its request rate (``rate_limited``) or its concurrent generations
    (``concurrency_limited``) (429, with Retry-After and RateLimit-* headers)."""

    status = 429
    code = "rate_limited"


class ConcurrencyLimited(RateLimited):
    """The key has as many generations in flight as it may (429)."""

    code = "concurrency_limited"


class Overloaded(DeskgenError):
    """The generator is at capacity (503, with Retry-After): refused at the door, before any work."""

    status = 503
    code = "overloaded"
