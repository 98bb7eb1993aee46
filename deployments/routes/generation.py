"""Generation: a prompt or a photo to an image, through the generation pipeline (deployments/pipeline.py),
answered as PNG, JSON or server-sent events by ``Accept`` (deployments/render.py)."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

from fastapi import Request
from fastapi.responses import Response
from ray import serve

from deployments import metrics, render
from deployments.access import api_key_of
from deployments.app import api
from deployments.http_errors import json_errors, request_id_of
from deployments.http_io import choose_format, image_body, json_body
from deployments.idempotent import idempotent
from deployments.ingress_models import FORM_SCHEMAS
from deployments.openapi import generation_answers
from deployments.pipeline import Caller, GenerationRun
from deployments.routes.base import RoutesBase
from deskgen_client.protocol import GenerateRequest, Text2ImgRequest


class GenerationRoutes(RoutesBase):
    """``/v1/text2img``, ``/v1/generate``."""

    @staticmethod
    def caller(request: Request) -> Caller:
        """The pipeline's view of the request; the run's exposure is kept on it, so that ``json_errors``
        settles it with the error the client gets."""
        return Caller(request_id_of(request), api_key_of(request), serve.get_multiplexed_model_id() or None,
                      on_exposure=lambda exposure: setattr(request.state, "exposure", exposure))  # fmt: skip

    async def answer(self, request: Request, run: GenerationRun) -> Response:
        output = choose_format(request.headers.get("accept", ""))
        if output == "sse":
            return await render.streamed(self.pipeline, run, metrics.route_of(request.scope))
        return await render.whole(self.pipeline, run, output)

    @api.post("/v1/text2img", openapi_extra=json_body(Text2ImgRequest),
              responses=generation_answers(400, 404, 409, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def text2img(self, request: Request) -> Response:
        """A prompt straight to the generator (no gate, no captions). With `Idempotency-Key`, a retry gets
        the first answer (the same image; no second generation or exposure)."""

        async def run() -> Response:
            caller = self.caller(request)
            body, _ = await self.parse(request, Text2ImgRequest, image="none")
            return await self.answer(request, await self.pipeline.prepare_text(body, caller))

        return await idempotent(self, request, "text2img", run)

    @api.post("/v1/generate", openapi_extra=image_body(GenerateRequest, FORM_SCHEMAS),
              responses=generation_answers(400, 404, 409, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def generate(self, request: Request) -> Response:
        """classify -> caption -> prompt -> generate -> locate. PNG by default; JSON or SSE by `Accept`.
        With `Idempotency-Key`, a retry gets the first answer (no second generation or exposure)."""

        async def run() -> Response:
            caller = self.caller(request)
            form, raw = await self.parse(request, GenerateRequest, image="required")
            return await self.answer(request, await self.pipeline.prepare_photo(form, raw, caller))

        return await idempotent(self, request, "generate", run)
