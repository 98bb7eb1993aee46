"""A generation's answer in the format the client asked for (``Accept``): a PNG with the run in its
headers, the JSON answer, or server-sent events as the pipeline's steps happen. The formats differ only
here; what happens is deployments/pipeline.py."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments import metrics
from deployments.http_errors import error_body, error_for, unwrap
from deployments.http_io import OutputFormat, sse
from deployments.pipeline import GenerationPipeline, GenerationRun
from deskgen.contracts import GeneratedImage, GenerationEvent
from deskgen_client.protocol import Captioned, Classified, GenerationResult, event_name


def json_result(result: GeneratedImage, fields: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The JSON answer (and the SSE ``done`` event), a :class:`~deskgen_client.protocol.GenerationResult`:
    the image, the run's ``fields`` (GenerationRun.answer), and the parameters the image was made with.
    The fields a run does not have (a text run's captions) are left out, not sent as null."""
    params = result.params
    answer = GenerationResult.model_validate({
        "request_id": request_id,
        "image_b64": base64.b64encode(result.png).decode(),
        "media_type": "image/png",
        **fields,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "steps": params.steps,
        "guidance": params.guidance,
        "width": params.width,
        "height": params.height,
        "metadata": result.metadata,
    })
    return answer.model_dump(mode="json", exclude_unset=True)


def headers(run: GenerationRun, result: GeneratedImage) -> dict[str, str]:
    """What a PNG (or JSON) answer says in its headers: the mix and how it was chosen, the seed, the
    replica, the stage timings, the A/B arm, the desk score and the products found."""
    out = {
        "X-Deskgen-Mix": run.mix.id,
        "X-Deskgen-Mix-Source": run.mix_info["source"],
        "X-Deskgen-Seed": str(run.params.seed),
        "X-Deskgen-Replica": result.replica,
        "Server-Timing": ", ".join(f"{k.removesuffix('_s')};dur={v * 1000:.1f}" for k, v in run.timings.items()),
    }
    if run.mix_info["arm"] is not None:
        out["X-Deskgen-AB-Arm"] = run.mix_info["arm"]
    if run.verdict is not None:
        out["X-Deskgen-Desk-Score"] = f"{run.verdict.score:.6f}"
    if run.located is not None:
        out["X-Deskgen-Products"] = run.located.status
        if run.located.status == "ok":
            out["X-Deskgen-Products-Found"] = f"{sum(i.found for i in run.located.items)}/{len(run.located.items)}"
    return out


async def whole(pipeline: GenerationPipeline, run: GenerationRun, output: OutputFormat) -> Response:
    """Every step, then the image as PNG or JSON."""
    result = await pipeline.run(run)
    if output == "json":
        return JSONResponse(json_result(result, run.answer(), run.caller.request_id), headers=headers(run, result))
    return Response(result.png, media_type="image/png", headers=headers(run, result))


async def streamed(pipeline: GenerationPipeline, run: GenerationRun, route: str) -> StreamingResponse:
    """Server-sent events: ``classified`` and ``captioned`` (photo runs), ``started``, a ``step`` per
    denoising step, ``located``, then ``done`` with the JSON answer, or ``error``. Everything up to the
    generation's first event happens before the answer starts, so a refusal keeps its status code."""
    prelude: list[bytes] = []
    if run.photo is not None:
        verdict = await pipeline.gate(run)
        captioned = await pipeline.caption(run)
        prelude = [
            sse("classified", Classified(score=verdict.score, threshold=verdict.threshold)),
            sse("captioned", Captioned(captions=captioned.captions, keywords=captioned.keyword_dicts(),
                                       prompt=run.params.prompt)),
        ]  # fmt: skip
    stream, first = await pipeline.stream(run)
    return StreamingResponse(
        _events(pipeline, run, stream, first, prelude, route),
        media_type="text/event-stream",
        headers={"X-Deskgen-Mix": run.mix.id, "Cache-Control": "no-cache"},
    )


async def _events(pipeline: GenerationPipeline, run: GenerationRun, stream: Any, first: GenerationEvent,
                  prelude: list[bytes], route: str) -> AsyncIterator[bytes]:  # fmt: skip
    event: GenerationEvent | None = first
    t = time.perf_counter()
    try:
        for chunk in prelude:
            yield chunk
        while event is not None:
            if isinstance(event, GeneratedImage):
                run.timings["generate_s"] = time.perf_counter() - t
                result = await pipeline.locate(run, event)
                assert run.located is not None
                yield sse("located", run.located)
                await pipeline.deliver(run, result)
                yield sse(result.event, json_result(result, run.answer(), run.caller.request_id))
                return
            yield sse(event_name(event), event)
            try:
                event = await pipeline.next(run, stream)
            except StopAsyncIteration:
                event = None
    except TimeoutError:
        run.exposure.settle("timeout", 504)
        metrics.request_error(route, 504, "timeout")
        yield sse("error", error_body("timeout", f"the request did not finish within its deadline of "
                                                 f"{run.deadline - run.started:.1f} s."))  # fmt: skip
    except Exception as exc:
        status, body, _ = error_for(unwrap(exc), pipeline.config().retry_after_s)
        run.exposure.settle(body["error"]["code"], status)
        metrics.request_error(route, status, body["error"]["code"])
        yield sse("error", body | {"status": status})
    finally:
        # The client went away before the image was done: not delivered, recorded as such.
        run.exposure.settle("client_closed", 499)
