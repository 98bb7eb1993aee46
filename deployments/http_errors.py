"""Every error the HTTP API answers is JSON ``{"error": {"code", "message", "field"?}, "request_id"}``.

:func:`error_for` maps an exception (a :class:`deskgen.errors.DeskgenError`, a validation error, Serve's
backpressure, a dead replica, a deadline) to its status, body and headers; routes wrap themselves in
:func:`json_errors`; the ingress registers handlers for what fails before a route runs.
"""

import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deployments import metrics
from deployments.door.errors import DoorRefusal
from deskgen import errors
from deskgen.concepts import UnknownConcept
from deskgen.errors import DeskgenError, InvalidParameter
from deskgen.limits import REQUEST_ID_PATTERN

log = logging.getLogger("ray.serve")

REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)

#: The HTTP status of each of the model layer's errors (the door's refusals carry their own). A subclass
#: takes its nearest listed base's; an error class listed nowhere is a 400.
STATUS: dict[type[DeskgenError], int] = {
    errors.InvalidParameter: 400,
    errors.UnknownMix: 404,
    errors.UnknownImage: 404,
    errors.UnknownExperiment: 404,
    UnknownConcept: 404,
    errors.FeedbackForbidden: 403,
    errors.FeedbackConflict: 409,
    errors.IdempotencyConflict: 409,
    errors.IdempotencyKeyReused: 422,
    errors.UnknownJob: 404,
    errors.JobQueueFull: 503,
    errors.JobsUnavailable: 503,
    errors.PayloadTooLarge: 413,
    errors.NotAnImage: 415,
    errors.NotADeskSetup: 422,
    errors.AdapterUnavailable: 422,
    errors.RecorderBacklog: 503,
    errors.RecorderUnavailable: 503,
    errors.LocatorUnavailable: 503,
}


def status_of(exc: DeskgenError) -> int:
    """The HTTP status a model-layer error (or a door refusal) is answered with."""
    if isinstance(exc, DoorRefusal):
        return exc.status
    return next((STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), 400)


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error}


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidParameter:
    """The first pydantic error as one precise message: field, rule, value."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query")) or None
    if first.get("type") == "extra_forbidden":
        named = f"`{field}`" if field else "a field with an empty name"
        return InvalidParameter(f"{named} is not a known field.", field=field or "")
    cause = (first.get("ctx") or {}).get("error")
    if first.get("type") == "value_error" and str(cause).startswith("`"):
        return InvalidParameter(str(cause), field=field)  # the rule's own sentence names the field and the value
    value = first.get("input")
    shown = f" but is {value!r}" if not isinstance(value, (dict, list)) and value is not None else ""
    return InvalidParameter(f"`{field}`: {first.get('msg', 'invalid')}{shown}.", field=field)


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a RayTaskError from a replica."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def request_id_of(request: Request) -> str:
    """The request's id: the ``X-Request-Id`` the client sent, or the one Serve's proxy gave it (the proxy
    also returns it as the response's ``X-Request-Id``, so the ingress never sets that header). An id
    that does not match :data:`~deskgen.limits.REQUEST_ID_PATTERN` is replaced here (error answers) and
    refused by :func:`check_request_id` (routes with a body)."""
    rid: str | None = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def check_request_id(request: Request) -> None:
    given = request.headers.get("x-request-id")
    if given is not None and not REQUEST_ID_RE.fullmatch(given):
        raise InvalidParameter(
            f"`X-Request-Id` must be 1-64 characters of A-Z a-z 0-9 . _ - but is {given[:80]!r}.", field="X-Request-Id"
        )


def error_for(exc: BaseException, retry_after_s: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, JSON body and extra headers for an exception (already unwrapped)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, DeskgenError):
        status = status_of(exc)
        own = exc.headers if isinstance(exc, DoorRefusal) else {}
        return status, {"error": exc.to_dict()}, (retry if status in (429, 503) else {}) | own
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return 400, {"error": validation_error(exc).to_dict()}, {}
    if isinstance(exc, BackPressureError):
        return 503, error_body("overloaded", "deskgen is at capacity: retry after Retry-After seconds."), retry
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        return 503, error_body("unavailable", f"a stage replica is unavailable ({type(exc).__name__}): retry."), retry
    if isinstance(exc, TimeoutError):
        return 504, error_body("timeout", "the request did not finish within its deadline (`timeout_s`)."), {}
    log.error("unexpected error: %r", exc, exc_info=exc)
    return 500, error_body("internal", f"internal error: {type(exc).__name__}"), {}


def json_error(request: Request, exc: BaseException, retry_after_s: int = 5) -> JSONResponse:
    status, body, headers = error_for(unwrap(exc), retry_after_s)
    # A generation request that already took its place among the experiment's exposures records the
    # error its client gets (a guardrail of its arm).
    exposure = getattr(request.state, "exposure", None)
    if exposure is not None:
        exposure.settle(body["error"]["code"], status)
    metrics.request_error(metrics.route_of(request.scope), status, body["error"]["code"])
    body["request_id"] = request_id_of(request)
    return error_response(status, body, headers)


def json_errors(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer any exception a route raises as JSON with its status (Retry-After from the live config);
    path parameters pass through."""

    @functools.wraps(route)
    async def wrapper(self: Any, request: Request, **path: Any) -> Any:
        try:
            return await route(self, request, **path)
        except Exception as exc:
            return json_error(request, exc, self.config.retry_after_s)

    return wrapper
