"""The catalogue a client reads before it asks: the mixes (and the live A/B split and weights), the limits,
the concept presets."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import datetime as dt

from fastapi import Request

from deployments.app import api
from deployments.http_errors import json_errors
from deployments.openapi import answers
from deployments.routes.base import RoutesBase
from deskgen_client.protocol import Concepts, Limits, Mixes


class CatalogueRoutes(RoutesBase):
    """``/v1/mixes``, ``/v1/limits``, ``/v1/concepts``."""

    @api.get("/v1/mixes", responses=answers(503))
    @json_errors
    async def mixes(self, request: Request) -> Mixes:
        """Adapters, the adapter files that cannot be loaded (``unavailable``: name -> reason; a mix naming
        one is answered 422), named mixes (with canonical ids) and the live A/B split."""
        catalog = await self.catalogue.catalog()
        total = sum(self.config.ab_split.values())
        return Mixes.model_validate({
            "adapters": sorted(catalog.available),
            "unavailable": dict(sorted(catalog.unavailable.items())),
            "named_mixes": {n: {"id": m.id, "weights": m.as_dict()} for n, m in catalog.named.items()},
            "default_mix": self.config.default_mix,
            "ab_split": {arm: share / total for arm, share in self.config.ab_split.items()},
            "ab_salt": self.config.ab_salt,
            "ab_policy": self.config.experiment.policy.public(),
            "ab_weights": await self.live_weights(),
        })

    async def live_weights(self) -> dict[str, float]:
        """The share of new users each arm gets now (the split, or the bandit's current weights)."""
        if not self.config.ab_split:
            return {}
        return await self.allocator.weights(self.config.experiment)

    @api.get("/v1/limits")
    async def limits(self) -> Limits:
        """The live request limits and defaults: what a client may send without a 400."""
        return Limits.model_validate(self.config.limits_document())

    @api.get("/v1/concepts")
    async def concepts(self) -> Concepts:
        """The concept presets, the weekday schedule with its time zone, and today's pick (``concept=auto``)."""
        return Concepts.model_validate(self.config.listing(dt.datetime.now(dt.UTC)))
