"""Operations: liveness (with the admission door), readiness of every stage, and the replica's process for
ops tools."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import asyncio
import os
from dataclasses import asdict
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve

from deployments.access import door
from deployments.app import api
from deployments.http_errors import unwrap
from deployments.http_io import awaitable
from deployments.routes.base import RoutesBase
from deskgen_client.protocol import Health, Readiness

#: Stages /readyz reports without waiting for them: generation goes on while they are down.
OPTIONAL_STAGES = frozenset({"recorder", "locator"})


class OpsRoutes(RoutesBase):
    """``/healthz``, ``/readyz``."""

    @api.get("/healthz")
    async def healthz(self) -> Health:
        """Liveness of the ingress itself: which replica answered, and its door (``admission``: the generation
        requests it holds, how many the generator takes from it, how many it shed, the pauses before a refused
        generation is sent again). Asks no stage."""
        door.ensure_polling()
        admission = asdict(door.admission.stats) | {"shed_load": door.shed_load, "topology_error": door.topology_error,
                                                     "router_retry_s": self.config.router_retry_s}  # fmt: skip
        return Health(status="ok", replica=serve.get_replica_context().replica_id.unique_id, admission=admission)

    async def info(self) -> dict[str, Any]:
        """This replica's process and id (a handle call, not a route: for ops tools and the fault tests)."""
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/readyz", responses={200: {"model": Readiness, "description": "every model stage answers"},
                                   503: {"model": Readiness, "description": "a model stage does not answer (same body)"}})  # fmt: skip
    async def readyz(self) -> JSONResponse:
        """Ready when every model stage answers a ping within 5 s. The experiment recorder and the product
        locator are reported but do not make the ingress unready: while the recorder is down, exposures wait
        in this replica's buffer (``exposures``: pending, written, failed flushes, requests refused because
        it was full); while the locator is down, images are delivered with ``products.status: failed``."""
        stages = {"classifier": self.classifier, "captioner": self.captioner, "generator": self.generator,
                  "recorder": self.recorder, "locator": self.locator}  # fmt: skip
        results: dict[str, str] = {}
        for name, handle in stages.items():
            if handle is None:
                results[name] = "not deployed"
                continue
            try:
                results[name] = await asyncio.wait_for(awaitable(handle.ping.remote()), 5.0)
            except Exception as exc:
                results[name] = f"unavailable: {type(unwrap(exc)).__name__}"
        ready = all(v == "ok" for name, v in results.items() if name not in OPTIONAL_STAGES)
        body = Readiness(ready=ready, stages=results, exposures=asdict(self.exposures.stats))
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)
