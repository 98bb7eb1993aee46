"""What the OpenAPI document says each route answers: every status it can send, each with the shared JSON
error body, and each success media type with the protocol's model of its answer. A unit test compares
this with the routes, so a route cannot forget a status it answers."""

from __future__ import annotations

from typing import Any

from deskgen.limits import SIDE_MULTIPLE, SizeLimits
from deskgen_client.protocol import ErrorBody, ExperimentList, FeedbackResult, GenerationResult
from deskgen_client.protocol.jobs import JobAnswer

REF = "#/components/schemas/"


STATUS_MEANING = {
    400: "a parameter is outside its documented range or malformed (the field is named)",
    401: "API keys are configured and the request has none or an unknown one (see WWW-Authenticate)",
    403: ("feedback from a caller who may not rate the image: with API keys configured only the key that "
          "generated it may; an image delivered to a user_id needs that user_id"),
    404: "an unknown mix, adapter, image, experiment or job",
    409: ("the image was delivered to another user, or the first request with this Idempotency-Key is still "
          "running"),
    413: "the body or the image is larger than the limit",
    415: "not an image, or a Content-Type other than multipart/form-data or application/json",
    422: ("the photo is not a desk setup (with its score and the threshold), the mix names a LoRA adapter "
          "whose file cannot be loaded (code adapter_unavailable, with adapter and reason), or the "
          "Idempotency-Key was used with another body (idempotency_key_reused)"),
    429: "the key is over its request rate or concurrent generations; retry after Retry-After (RateLimit-* headers)",
    503: ("at capacity, a stage replica down, the experiment store unreachable, (/v1/locate) no product locator, "
          "or (jobs) the job queue full or its store unreachable; retry after Retry-After"),
    504: "the request's deadline (timeout_s) passed; the generation was cancelled",
}

#: The success answer of the generation routes, by the request's Accept header.
GENERATION_CONTENT = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"$ref": REF + "GenerationResult"}},
    "text/event-stream": {"schema": {"type": "string", "description": "events: classified, captioned, started, "
                                     "step (one per denoising step), located (the products), done (the JSON answer) "
                                     "or error"}},
}  # fmt: skip


FEEDBACK_ANSWERS = {201: {"description": "stored (committed)", "model": FeedbackResult},
                    200: {"description": "a repeat of a stored (image_id, event): not counted again", "model": FeedbackResult}}  # fmt: skip


JOB_ANSWERS = {202: {"description": "queued (the job; `Location` names it)", "model": JobAnswer},
               200: {"description": "`Prefer: wait=N` and the job ended within N s (the finished job)", "model": JobAnswer}}  # fmt: skip


def answers(*statuses: int, ok: dict[int, dict[str, Any]] | None = None) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for a route: its success answers (``ok``) and its error statuses."""
    out: dict[int | str, dict[str, Any]] = {status: answer for status, answer in (ok or {}).items()}
    for status in statuses:
        out[status] = {"model": ErrorBody, "description": STATUS_MEANING[status]}
    return out


def generation_answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    # `model` puts GenerationResult among the document's schemas; `content` names it for JSON beside the
    # PNG and the event stream.
    return answers(*statuses, ok={200: {"description": "the image (by Accept)", "model": GenerationResult,
                                        "content": GENERATION_CONTENT}})  # fmt: skip


def page_or_json(description: str, model: type[ExperimentList] | None = None) -> dict[int, dict[str, Any]]:
    """An answer that is JSON (the model's, or any object) or an HTML page for ``Accept: text/html``."""
    json_schema = {"$ref": REF + model.__name__} if model is not None else {"type": "object"}
    answer: dict[str, Any] = {"description": description + " (an HTML page for Accept: text/html)",
                              "content": {"application/json": {"schema": json_schema}, "text/html": {"schema": {"type": "string"}}}}  # fmt: skip
    if model is not None:
        answer["model"] = model
    return {200: answer}


def without_fastapi_422(document: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 ``HTTPValidationError`` FastAPI adds to routes with parameters: deskgen answers
    validation errors 400 with :class:`ErrorBody` (422 means only "not a desk setup", where documented)."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(answer):
                operation["responses"].pop("422")
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document


def with_access(document: dict[str, Any], *, keys: bool) -> dict[str, Any]:
    """When API keys are configured: the two ways to present one, required by every route but the open
    ones (health, docs), each of which may then answer 401 and 429. Without keys the API is open and the
    document says nothing about them."""
    from deployments.access import OPEN_PATHS

    if not keys:
        return document
    schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"}
    schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in document.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            for status in (401, 429):
                operation.setdefault("responses", {})[str(status)] = {
                    "description": STATUS_MEANING[status],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    return document


def with_limits(document: dict[str, Any], limits: SizeLimits, max_upload_bytes: int) -> dict[str, Any]:
    """State the live limits in every request body (``steps``, ``width``, ``height``, the photo's bytes):
    they come from the ingress's ``user_config``, which a ``serve deploy`` may change, so the request models
    carry only the fixed bounds and the document gets these at each reconfigure."""
    bounds = {
        "steps": {"maximum": limits.max_steps},
        "width": {"minimum": limits.min_side, "maximum": limits.max_side, "multipleOf": SIDE_MULTIPLE},
        "height": {"minimum": limits.min_side, "maximum": limits.max_side, "multipleOf": SIDE_MULTIPLE},
        "image": {"maxLength": max_upload_bytes},
    }
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = media.get("schema", {})
                # The body's own fields, and those of the bodies it nests (a job's text2img or generate).
                for part in [schema, *schema.get("$defs", {}).values()]:
                    for name, prop in part.get("properties", {}).items():
                        for branch in prop.get("anyOf", [prop]):
                            if name in bounds and branch.get("type") in ("integer", "string"):
                                branch.update(bounds[name])
    return document


def contract(raw: dict[str, Any], limits: SizeLimits, max_upload_bytes: int, *, keys: bool) -> dict[str, Any]:
    """The OpenAPI document the ingress serves: FastAPI's, with deskgen's error answers, the live limits
    and, when keys are configured, how to present one."""
    return with_access(with_limits(without_fastapi_422(raw), limits, max_upload_bytes), keys=keys)
