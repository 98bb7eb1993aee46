"""The experiment loop's routes: feedback on a delivered image, the experiments, one experiment's report."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from deployments.access import api_key_of
from deployments.app import api
from deployments.http_errors import json_errors, unwrap
from deployments.http_io import json_body, wants_html
from deployments.openapi import FEEDBACK_ANSWERS, answers, page_or_json
from deployments.routes.base import RoutesBase
from deskgen.errors import UnknownExperiment, UnknownImage
from deskgen.experiments.page import render_experiment_list_page, render_report_page
from deskgen.experiments.records import Feedback, Sender
from deskgen_client.protocol import ExperimentList, FeedbackRequest, FeedbackResult


class ExperimentRoutes(RoutesBase):
    """``/v1/feedback``, ``/v1/experiments``, ``/v1/experiments/{experiment_id}``."""

    @api.post("/v1/feedback", status_code=201, openapi_extra=json_body(FeedbackRequest),
              responses=answers(400, 403, 404, 409, 413, 415, 503, ok=FEEDBACK_ANSWERS))  # fmt: skip
    @json_errors
    async def feedback(self, request: Request) -> JSONResponse:
        """What the user did with an image. 201 once stored (committed), 200 for a repeat of the same
        (image_id, event): a retry never double counts. 404 unknown image. Who may rate an image: with API
        keys configured, only the API key that generated it (403 `feedback_forbidden`, field `image_id`);
        an image delivered to a `user_id` needs that `user_id` (403 without one, field `user_id`; 409
        `user_mismatch` with another)."""
        body, _ = await self.parse(request, FeedbackRequest, image="none")
        fb = Feedback(image_id=body.image_id, event=body.event, user_id=body.user_id, value=body.value)
        sender = Sender(api_key=api_key_of(request), keys_required=bool(self.config.api_keys))
        # This replica's own exposures first: the image may have been delivered a moment ago.
        await self.exposures.flush()
        try:
            new = await self.recorder_call(self.recorder.record_feedback.remote(fb, sender))
        except Exception as exc:
            if not isinstance(unwrap(exc), UnknownImage):
                raise
            # Delivered through another ingress replica, whose buffer flushes within exposure_flush_s.
            await asyncio.sleep(2 * self.config.exposure_flush_s)
            new = await self.recorder_call(self.recorder.record_feedback.remote(fb, sender))
        answer = FeedbackResult(image_id=fb.image_id, event=fb.event, recorded=True, duplicate=not new)
        return JSONResponse(answer.model_dump(mode="json"), status_code=answer.status)

    @api.get("/v1/experiments", responses=answers(503, ok=page_or_json("every experiment", ExperimentList)))
    @json_errors
    async def experiments(self, request: Request) -> Response:
        """Every experiment with its split, salt, start, exposures and users; ``current`` is the one the
        live config runs. HTML for ``Accept: text/html``."""
        await self.exposures.flush()  # what this replica delivered so far is in the answer
        listed: list[dict[str, Any]] = await self.recorder_call(self.recorder.experiments.remote())
        if wants_html(request):
            return HTMLResponse(render_experiment_list_page(listed))
        return JSONResponse(ExperimentList(current=self.config.experiment.id, experiments=listed).model_dump(mode="json"))

    @api.get("/v1/experiments/{experiment_id}", responses=answers(404, 503, ok=page_or_json("the report")))
    @json_errors
    async def experiment_report(self, request: Request, experiment_id: str) -> Response:
        """Per arm: users, exposures, event rates with 95 % CIs (the user is the unit), differences against
        the control, the sample-ratio test and guardrails. HTML with a chart for ``Accept: text/html``."""
        await self.exposures.flush()
        report = await self.recorder_call(self.recorder.report.remote(experiment_id, self.config.experiment))
        if report is None:
            raise UnknownExperiment(f"`experiment_id`: no experiment {experiment_id!r} was recorded.", field="experiment_id")
        if wants_html(request):
            return HTMLResponse(render_report_page(report))
        return JSONResponse(report)
