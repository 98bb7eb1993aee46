"""A request body into its typed model: multipart forms (the photo a file part ``image``, repeated fields
as lists) and JSON (the photo as ``image_b64``), bounded, with every refusal a 4xx naming the field."""

import base64
import binascii
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.http_errors import check_request_id, validation_error
from deployments.http_io import json_object, read_body
from deployments.ingress_models import form_values
from deskgen.errors import InvalidParameter, NotAnImage
from deskgen.limits import MAX_FORM_FIELDS, MAX_FORM_FILES

T = TypeVar("T")


async def parse(request: Request, model: type[T], *, image: Literal["required", "none"], max_upload_bytes: int) -> tuple[T, bytes | None]:
    """Validate a multipart or JSON request into ``model``; return it and the raw image bytes (from the
    ``image`` file part, or ``image_b64``). ``image="required"``: a request without one is a 400."""
    check_request_id(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = max_upload_bytes * 4 // 3 + 64 * 1024  # base64 and form overhead
    body = await read_body(request, limit, "image" if image == "required" else "body")
    raw_image: bytes | None = None
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
        except StarletteHTTPException as exc:  # too many fields or files, a malformed multipart body
            raise InvalidParameter(
                f"`body` is not an acceptable multipart form ({exc.detail}): at most {MAX_FORM_FIELDS} fields "
                f"and {MAX_FORM_FILES} files.", field="body",
            ) from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image" or image == "none":
                    raise InvalidParameter(f"`{key}` is not a known file field.", field=key)
                raw_image = await value.read()
            elif key == "image":
                raise InvalidParameter(
                    "`image` must be a file part (curl: -F image=@desk.jpg), not a text field.", field="image"
                )
            elif key in fields:  # a repeated field (products=monitor&products=lamp) is a list
                fields[key] = [*fields[key], value] if isinstance(fields[key], list) else [fields[key], value]
            else:
                fields[key] = value
        fields = form_values(fields)
    elif content_type == "application/json":
        fields = json_object(body)
    else:
        raise NotAnImage(
            f"`Content-Type` must be multipart/form-data or application/json but is {content_type or 'missing'!r}.",
            field="Content-Type",
        )
    try:
        parsed = model.model_validate(fields)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise validation_error(exc) from None
    b64 = getattr(parsed, "image_b64", None)
    if b64 is not None:
        if raw_image is not None:
            raise InvalidParameter("send the photo once: `image` or `image_b64`, not both.", field="image_b64")
        try:
            raw_image = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameter("`image_b64` is not valid base64.", field="image_b64") from None
    if image == "required" and raw_image is None:
        raise InvalidParameter(
            "`image` is required: a multipart file field `image`, or `image_b64` in a JSON body.", field="image"
        )
    return parsed, raw_image
