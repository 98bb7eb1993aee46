"""Analysis of a photo without generating: its desk score, its captions and prompt, where products are."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import asyncio
from typing import Any

from fastapi import Request

from deployments.app import api
from deployments.http_errors import json_errors
from deployments.http_io import image_body
from deployments.ingress_models import LOCATE_FORM_SCHEMAS
from deployments.openapi import answers
from deployments.routes.base import RoutesBase
from deskgen.boxes import clean_products
from deskgen.contracts import CaptionResult, GateVerdict
from deskgen.errors import LocatorUnavailable
from deskgen_client.protocol import (
    Caption,
    CaptionRequest,
    Classification,
    ClassifyRequest,
    LocateRequest,
    LocateResult,
    ProductLocation,
)


class AnalysisRoutes(RoutesBase):
    """``/v1/classify``, ``/v1/caption``, ``/v1/locate``."""

    @api.post("/v1/classify", openapi_extra=image_body(ClassifyRequest), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def classify(self, request: Request) -> Classification:
        """Desk score of a photo (200 either way; /v1/generate answers 422 below the threshold)."""
        _, raw = await self.parse(request, ClassifyRequest, image="required")
        image = self.decode(raw)
        verdict: GateVerdict = await self.pipeline.within(self.classifier.classify.remote(image), None)
        return verdict.public()

    @api.post("/v1/caption", openapi_extra=image_body(CaptionRequest), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def caption(self, request: Request) -> Caption:
        """Captions, ranked keywords and the prompt a photo would give."""
        form, raw = await self.parse(request, CaptionRequest, image="required")
        image = self.decode(raw)
        result: CaptionResult = await self.pipeline.within(self.captioner.caption.remote(image, form.style), None)
        return result.public()

    @api.post("/v1/locate", openapi_extra=image_body(LocateRequest, LOCATE_FORM_SCHEMAS), responses=answers(400, 413, 415, 503, 504),
              response_model_exclude_unset=True)  # fmt: skip
    @json_errors
    async def locate_products(self, request: Request) -> LocateResult:
        """Where the named products are in any image (one the backend already has, or one deskgen made):
        per product its boxes in pixels and normalised to [0, 1], with scores; ``found: false`` when none
        passes the threshold. ``annotate`` adds a copy with the boxes drawn."""
        form, raw = await self.parse(request, LocateRequest, image="required")
        image = self.decode(raw)
        if self.locator is None:
            raise LocatorUnavailable("`products`: this deployment has no product locator.", field="products")
        located: ProductLocation = await self.pipeline.within(self.locator.locate.remote(image, clean_products(form.products)), None)
        located = located.model_copy(update={"source": "request"})
        # Every field of the products is sent (null included); annotated_b64 only when asked for.
        answer: dict[str, Any] = {"products": located.model_dump(mode="json")}
        if form.annotate:
            answer["annotated_b64"] = await asyncio.to_thread(self.pipeline.annotated_b64, image, located)
        return LocateResult.model_validate(answer)
