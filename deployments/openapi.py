"""What the OpenAPI document says each route answers: every status it can send, each with the shared JSON
error body, and each success media type. A unit test compares this with the routes, so a route cannot
forget a status it answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(..., description="stable machine-readable code, e.g. invalid_parameter, not_a_desk_setup")
    message: str = Field(..., description="what was wrong, naming the field and the rule")
    field: str | None = Field(None, description="the request field at fault, when one is")


class ErrorBody(BaseModel):
    """Every error deskgen answers (422 adds ``score`` and ``threshold`` to ``error``)."""

    error: ErrorDetail
    request_id: str


STATUS_MEANING = {
    400: "a parameter is outside its documented range or malformed (the field is named)",
    404: "an unknown mix, adapter, image or experiment",
    409: "the image was delivered to another user",
    413: "the body or the image is larger than the limit",
    415: "not an image, or a Content-Type other than multipart/form-data or application/json",
    422: "the photo is not a desk setup (with its score and the threshold)",
    503: "at capacity, a stage replica down, or the experiment store unreachable; retry after Retry-After",
    504: "the request's deadline (timeout_s) passed; the generation was cancelled",
}

#: The success answer of the generation routes, by the request's Accept header.
GENERATION_CONTENT = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "description": "image_b64, the request id, captions, "
                                    "keywords, prompt, mix, seed, steps, size, timings and metadata"}},
    "text/event-stream": {"schema": {"type": "string", "description": "events: classified, captioned, started, "
                                     "step (one per denoising step), done (the JSON answer) or error"}},
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
