"""schemathesis hooks for tests/serve/test_contract.py (loaded through ``SCHEMATHESIS_HOOKS``).

Every multipart form value is text on the wire. schemathesis 4.32 knows this for urlencoded forms but not
for multipart ones: to make a "schema-violating" request it may turn a text field (``style``, ``mix``,
``user_id``, ``negative_prompt``) into a number, which is sent as the text ``5`` — a valid value the
server rightly accepts, reported as a failure. Such negative cases are dropped here; every other case,
negative or positive, runs.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_negative or case.media_type != "multipart/form-data":
        return True
    if not isinstance(case.body, dict):
        return True
    text_fields = _text_fields(context.operation)
    return not any(
        name in text_fields and isinstance(value, (int, float, bool)) for name, value in case.body.items()
    )


def _text_fields(operation: Any) -> set[str]:
    body = operation.definition.raw.get("requestBody", {})
    schema = body.get("content", {}).get("multipart/form-data", {}).get("schema", {})
    return {name for name, prop in schema.get("properties", {}).items()
            if prop.get("type") == "string" and prop.get("format") != "binary"}  # fmt: skip
