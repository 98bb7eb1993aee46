"""The OpenAPI document is the contract a generated client is built from: every route documents every status
it can answer with the shared error body, and the generation routes their three success media types."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.unit

#: What each route can answer besides success: the errors its code paths raise (see deployments/routes/ and deployments/pipeline.py).
ERRORS = {
    ("post", "/v1/generate"): {400, 404, 409, 413, 415, 422, 503, 504},  # 409/422: Idempotency-Key
    ("post", "/v1/text2img"): {400, 404, 409, 413, 415, 422, 503, 504},
    ("post", "/v1/classify"): {400, 413, 415, 503, 504},
    ("post", "/v1/caption"): {400, 413, 415, 503, 504},
    ("post", "/v1/feedback"): {400, 403, 404, 409, 413, 415, 503},
    ("get", "/v1/experiments"): {503},
    ("get", "/v1/experiments/{experiment_id}"): {404, 503},
    ("get", "/v1/mixes"): {503},
    ("post", "/v1/jobs"): {400, 404, 409, 413, 415, 422, 503},
    ("get", "/v1/jobs/{job_id}"): {404, 503},
    ("post", "/v1/jobs/{job_id}/cancel"): {404, 503},
    ("get", "/v1/jobs/{job_id}/events"): {400, 404, 503},
    ("get", "/v1/jobs/{job_id}/images/{index}"): {400, 404, 503},
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    from deployments.ingress import api

    return api.openapi()


def test_every_route_documents_each_error_it_answers_with_the_error_body(document: dict[str, Any]) -> None:
    for (method, path), statuses in ERRORS.items():
        responses = document["paths"][path][method]["responses"]
        documented = {int(s) for s in responses if int(s) >= 400}
        assert documented == statuses, (method, path, documented)
        for status in statuses:
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    body = document["components"]["schemas"]["ErrorBody"]
    assert set(body["required"]) == {"error", "request_id"}
    assert "HTTPValidationError" not in document["components"]["schemas"]  # deskgen answers 400, not FastAPI's 422


def test_generation_routes_document_png_json_and_sse(document: dict[str, Any]) -> None:
    for path in ("/v1/generate", "/v1/text2img"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"image/png", "application/json", "text/event-stream"} <= set(content), path
        assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert set(document["paths"]["/v1/feedback"]["post"]["responses"]) >= {"200", "201"}
