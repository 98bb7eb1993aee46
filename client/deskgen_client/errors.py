"""The client's typed errors: one class per HTTP status the API answers, each carrying the JSON error.

Every error the server answers is ``{"error": {"code", "message", "field"?, ...}, "request_id"}``
(deployments/http_errors.py). :func:`error_from_response` turns such an answer — or an SSE ``error``
event, or a body that is not that JSON at all (a proxy's page) — into the matching
:class:`DeskgenError` subclass, so a caller catches :class:`NotADesk` rather than testing ``status == 422``.

These are the *client's* errors; :mod:`deskgen.errors` holds the server's, which this module never imports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any


class DeskgenError(Exception):
    """An answer other than success, or no answer at all.

    ``status`` is the HTTP status (``None`` when no answer came back), ``code`` the server's stable
    machine-readable code, ``field`` the request field at fault (when one is), ``request_id`` the id of
    the attempt that failed, ``retry_after`` the seconds the server asked to wait (503 and 429), and
    ``body`` the whole JSON error, including extra keys such as ``score``."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        field: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.request_id = request_id
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of the JSON body (``code``, ``message``, ``field``, extras)."""
        error = self.body.get("error")
        return dict(error) if isinstance(error, dict) else {}

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field else ""
        status = f"HTTP {self.status} " if self.status is not None else ""
        return f"{status}{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, field={self.field!r}, " \
               f"message={self.message!r}, request_id={self.request_id!r})"  # fmt: skip


class InvalidRequest(DeskgenError):
    """400: a parameter is outside its range or malformed; ``field`` names it."""


class Unauthorized(DeskgenError):
    """401: no API key, or a wrong one; ``www_authenticate`` is the server's challenge."""

    @property
    def www_authenticate(self) -> str | None:
        return self.headers.get("www-authenticate")


class Forbidden(DeskgenError):
    """403: feedback from a caller who may not rate the image (``feedback_forbidden``): with API keys
    configured only the key that generated it may; an image delivered to a user needs that ``user_id``."""


class NotFound(DeskgenError):
    """404: an unknown mix or adapter (``unknown_mix``), image (``unknown_image``), experiment or route."""


class Conflict(DeskgenError):
    """409: feedback names a user the image was not delivered to (``user_mismatch``)."""


class PayloadTooLarge(DeskgenError):
    """413: the photo or the body is over the server's limit."""


class UnsupportedMediaType(DeskgenError):
    """415: the upload is not a decodable image, or the body's content type is wrong."""


class NotADesk(DeskgenError):
    """422: the gate scored the photo below its threshold; ``score`` and ``threshold`` say by how much."""

    @property
    def score(self) -> float | None:
        value = self.error.get("score")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def threshold(self) -> float | None:
        value = self.error.get("threshold")
        return float(value) if isinstance(value, (int, float)) else None


class IdempotencyKeyReused(DeskgenError):
    """422 ``idempotency_key_reused``: the Idempotency-Key was sent before with another body (a client
    bug: a key names one logical request)."""


@dataclass(frozen=True)
class RateLimit:
    """The ``RateLimit-*`` headers of an answer: requests allowed per window, left, seconds to reset."""

    limit: int | None
    remaining: int | None
    reset: float | None
    policy: str | None = None


class RateLimited(DeskgenError):
    """429: this API key sent too many requests; retried after ``Retry-After`` within the retry budget."""

    @property
    def rate_limit(self) -> RateLimit | None:
        return parse_rate_limit(self.headers)


class ServerError(DeskgenError):
    """5xx other than 503 and 504: a fault on the server's side."""


class Overloaded(ServerError):
    """503: at capacity (``overloaded``), a stage replica down (``unavailable``), or the experiment store
    behind (``recorder_backlog``, ``recorder_unavailable``). Carries ``Retry-After``; retried."""


class DeadlineExceeded(ServerError):
    """504: the request did not finish within its ``timeout_s``. Not retried: the same request would
    take as long again."""


class DeskgenConnectionError(DeskgenError):
    """No (complete) answer: the connection failed, timed out, or the event stream ended early.
    ``sent`` is False when the request never left this machine (refused connection, connect timeout),
    which is the only transport failure the client retries."""

    def __init__(self, message: str, *, sent: bool, code: str = "connection_error", request_id: str | None = None) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.sent = sent


#: Status -> error class; any other 4xx is a plain DeskgenError, any other 5xx a ServerError.
ERRORS_BY_STATUS: dict[int, type[DeskgenError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: NotADesk,
    429: RateLimited,
    503: Overloaded,
    504: DeadlineExceeded,
}


#: Codes whose class is not their status's.
ERRORS_BY_CODE: dict[str, type[DeskgenError]] = {"idempotency_key_reused": IdempotencyKeyReused}


def error_class(status: int, code: str | None = None) -> type[DeskgenError]:
    if code in ERRORS_BY_CODE:
        return ERRORS_BY_CODE[code]
    if status in ERRORS_BY_STATUS:
        return ERRORS_BY_STATUS[status]
    return ServerError if status >= 500 else DeskgenError


def error_from_body(
    status: int,
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    now: float | None = None,
) -> DeskgenError:
    """The typed error for a parsed JSON error body (an HTTP answer's, or an SSE ``error`` event's)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    error = body.get("error")
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or f"http_{status}")
    message = str(error.get("message") or f"the server answered HTTP {status}")
    field = error.get("field")
    rid = body.get("request_id") or headers.get("x-request-id") or request_id
    return error_class(status, code)(
        message,
        status=status,
        code=code,
        field=str(field) if field is not None else None,
        request_id=str(rid) if rid else None,
        retry_after=parse_retry_after(headers.get("retry-after"), now=now),
        body=body,
        headers=headers,
    )


def error_from_response(
    status: int, headers: Mapping[str, str], content: bytes, *, request_id: str | None = None, now: float | None = None
) -> DeskgenError:
    """The typed error for an HTTP answer. A body that is not the API's JSON error (a proxy's text or
    HTML page) still gives the status's class, with the start of the text as its message."""
    try:
        body = json.loads(content) if content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        text = content[:300].decode("utf-8", "replace").strip()
        body = {"error": {"code": f"http_{status}", "message": text or f"the server answered HTTP {status}"}}
    return error_from_body(status, body, headers=headers, request_id=request_id, now=now)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds (``"5"``) or an HTTP-date (RFC 9110 §10.2.3); a date in
    the past is 0. ``None`` when absent or unreadable (a malformed header is ignored, not obeyed)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit | None:
    """The rate-limit state from ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (and ``-Policy``), or
    from the combined ``RateLimit: limit=10, remaining=0, reset=30`` form (also ``r=``/``t=`` keys of the
    newer IETF draft). ``None`` when the answer has none of them."""
    lowered = {k.lower(): v for k, v in headers.items()}
    values: dict[str, str] = {}
    for key in ("limit", "remaining", "reset"):
        if f"ratelimit-{key}" in lowered:
            values[key] = lowered[f"ratelimit-{key}"]
    combined = lowered.get("ratelimit")
    if combined:
        aliases = {"limit": "limit", "q": "limit", "remaining": "remaining", "r": "remaining", "reset": "reset", "t": "reset"}
        for part in combined.replace(",", ";").split(";"):
            name, _, raw = part.strip().partition("=")
            if name.strip().lower() in aliases and raw:
                values.setdefault(aliases[name.strip().lower()], raw.strip())
    policy = lowered.get("ratelimit-policy")
    if not values and policy is None:
        return None
    return RateLimit(
        limit=_leading_int(values.get("limit")),
        remaining=_leading_int(values.get("remaining")),
        reset=parse_retry_after(values.get("reset")),
        policy=policy,
    )


def _leading_int(value: str | None) -> int | None:
    """``"100"`` and ``"100, 100;w=60"`` (a limit followed by its policy) both read as 100."""
    if value is None:
        return None
    digits = ""
    for char in value.strip():
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None
