"""The ingress's FastAPI app, built in one place: the middleware order, the OpenAPI document (restated by
each reconfigure with the live limits), the documentation and the web page, and the error handlers. The
routes are declared on ``api`` by the modules of deployments/routes/, one per resource."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import logging
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from deployments import metrics
from deployments.access import AccessMiddleware
from deployments.http_errors import error_body, error_response, json_error, request_id_of
from deployments.ingress_models import IngressConfig
from deployments.openapi import contract

log = logging.getLogger("ray.serve")


api = FastAPI(
    title="deskgen",
    version="1.0.0",
    description="Upload a desk photo, get a new desk-setup image in a LoRA style mix.",
    docs_url=None,  # served below from local assets: deskgen runs where no CDN can be reached
    redoc_url=None,
)
# The door first (innermost), so the request metrics (outermost) count its refusals too.
api.add_middleware(AccessMiddleware, routes=api.router.routes)
api.add_middleware(metrics.RequestMetricsMiddleware)
api.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
#: The web page for people (deployments/web/: no build step, no CDN), found next to this module.
WEB_DIR = Path(__file__).resolve().parent / "web"
api.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")


def _openapi(config: IngressConfig | None = None) -> dict[str, Any]:
    """The document for ``config`` (built again by each reconfigure: it states the live limits and keys)."""
    if config is not None or api.openapi_schema is None:
        config = config or IngressConfig()
        api.openapi_schema = None
        api.openapi_schema = contract(FastAPI.openapi(api), config.limits, config.max_upload_bytes, keys=bool(config.api_keys))
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


@api.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """The web page: try a photo or a prompt, watch it generate, compare mixes, send feedback. It uses only
    the public API (its assets under /ui/)."""
    return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@api.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    """Swagger UI for the OpenAPI document, with its script and style served by deskgen itself."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="deskgen API", swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )  # fmt: skip


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return json_error(request, exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail)) | {"request_id": request_id_of(request)}
    return error_response(exc.status_code, body, dict(exc.headers or {}))
