"""What the OpenAPI document says each route answers: every status it can send, each with the shared JSON
error body, and each success media type. A unit test compares this with the routes, so a route cannot
forget a status it answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deskgen.limits import SIDE_MULTIPLE, SizeLimits


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(..., description="stable machine-readable code, e.g. invalid_parameter, not_a_desk_setup")
    message: str = Field(..., description="what was wrong, naming the field and the rule")
    field: str | None = Field(None, description="the request field at fault, when one is")


class ErrorBody(BaseModel):
    """Every error deskgen answers (422 adds ``score`` and ``threshold`` to ``error``, or ``adapter`` and
    ``reason`` for an unavailable LoRA adapter)."""

    error: ErrorDetail
    request_id: str


STATUS_MEANING = {
    400: "a parameter is outside its documented range or malformed (the field is named)",
    401: "API keys are configured and the request has none or an unknown one (see WWW-Authenticate)",
    403: ("feedback from a caller who may not rate the image: with API keys configured only the key that "
          "generated it may; an image delivered to a user_id needs that user_id"),
    404: "an unknown mix, adapter, image or experiment",
    409: "the image was delivered to another user",
    413: "the body or the image is larger than the limit",
    415: "not an image, or a Content-Type other than multipart/form-data or application/json",
    422: ("the photo is not a desk setup (with its score and the threshold), or the mix names a LoRA adapter "
          "whose file cannot be loaded (code adapter_unavailable, with adapter and reason)"),
    429: "the key is over its request rate or concurrent generations; retry after Retry-After (RateLimit-* headers)",
    503: ("at capacity, a stage replica down, the experiment store unreachable, or (/v1/locate) no product locator; "
          "retry after Retry-After"),
    504: "the request's deadline (timeout_s) passed; the generation was cancelled",
}

#: The success answer of the generation routes, by the request's Accept header.
GENERATION_CONTENT = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "description": "image_b64, the request id, captions, "
                                    "keywords, prompt, mix, seed, steps, size, timings, metadata and products (per "
                                    "product its boxes in pixels and normalised, with scores; annotated_b64 when asked)"}},
    "text/event-stream": {"schema": {"type": "string", "description": "events: classified, captioned, started, "
                                     "step (one per denoising step), located (the products), done (the JSON answer) "
                                     "or error"}},
}  # fmt: skip


_FEEDBACK_STORED = {"application/json": {"schema": {"type": "object", "description": "image_id, event, recorded, duplicate"}}}
FEEDBACK_ANSWERS = {201: {"description": "stored (committed)", "content": _FEEDBACK_STORED},
                    200: {"description": "a repeat of a stored (image_id, event): not counted again", "content": _FEEDBACK_STORED}}  # fmt: skip


def answers(*statuses: int, ok: dict[int, dict[str, Any]] | None = None) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for a route: its success answers (``ok``) and its error statuses."""
    out: dict[int | str, dict[str, Any]] = {status: answer for status, answer in (ok or {}).items()}
    for status in statuses:
        out[status] = {"model": ErrorBody, "description": STATUS_MEANING[status]}
    return out


def generation_answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return answers(*statuses, ok={200: {"description": "the image (by Accept)", "content": GENERATION_CONTENT}})


def page_or_json(description: str) -> dict[int, dict[str, Any]]:
    return {200: {"description": description + " (an HTML page for Accept: text/html)",
                  "content": {"application/json": {"schema": {"type": "object"}}, "text/html": {"schema": {"type": "string"}}}}}  # fmt: skip


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
                for name, prop in media.get("schema", {}).get("properties", {}).items():
                    for branch in prop.get("anyOf", [prop]):
                        if name in bounds and branch.get("type") in ("integer", "string"):
                            branch.update(bounds[name])
    return document


def contract(raw: dict[str, Any], limits: SizeLimits, max_upload_bytes: int, *, keys: bool) -> dict[str, Any]:
    """The OpenAPI document the ingress serves: FastAPI's, with deskgen's error answers, the live limits
    and, when keys are configured, how to present one."""
    return with_access(with_limits(without_fastapi_422(raw), limits, max_upload_bytes), keys=keys)
