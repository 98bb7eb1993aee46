"""The ingress's door, an ASGI middleware in front of every route: API keys (401), per-key rate and
concurrency limits (429) and admission control (503), each decided from the request line and headers
alone, before the body is parsed or a photo decoded.

The state lives in :data:`door`, one per ingress replica process; the replica's ``reconfigure`` gives it
the live ``user_config`` (keys, limits, ``retry_after_s``) and a background task keeps the generator's
capacity and the number of ingress replicas fresh from the Serve controller (every
:data:`TOPOLOGY_REFRESH_S`).
"""

import asyncio
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.routing import Match

from deployments import metrics
from deployments.door.admission import Admission
from deployments.door.apikeys import ApiKey, KeyRing, presented_key
from deployments.door.errors import ConcurrencyLimited, Overloaded, RateLimited, Unauthorized
from deployments.door.ratelimit import KeyQuotas
from deployments.http_errors import error_for, error_response, request_id_of
from deployments.http_io import drain
from deskgen.errors import DeskgenError
from deskgen.limits import MAX_DRAIN_BYTES

log = logging.getLogger("ray.serve")

#: Paths anyone may reach, with or without a key: health probes, the API's documentation and the web page
#: (`/` and its assets: public; the API calls it makes carry the key its user types in).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/"})
OPEN_PREFIXES = ("/docs/assets/", "/ui/")
#: The routes that run the generator: admission control and the concurrency quota apply to them.
GENERATION_ROUTES = frozenset({("POST", "/v1/generate"), ("POST", "/v1/text2img")})
#: How often the generator's replicas and queue limits, and the number of ingress replicas, are re-read.
TOPOLOGY_REFRESH_S = 2.0
#: The deployments whose shape the door follows (names in serve_config.yaml).
GENERATOR = "Generator"
INGRESS = "Ingress"


class Door:
    """Keys, quotas and admission of one ingress replica."""

    def __init__(self) -> None:
        self.keys = KeyRing([])
        self.quotas = KeyQuotas()
        self.admission = Admission()
        self.shed_load = True
        self.retry_after_s = 5
        self._poller: asyncio.Task[None] | None = None
        self.topology_error: str | None = None
        #: Generation requests of this replica being answered now (admitted or not shed at all).
        self.generations_in_flight = 0

    def configure(self, api_keys: list[ApiKey], *, shed_load: bool, retry_after_s: int) -> None:
        self.keys = KeyRing(api_keys)
        self.quotas.forget_except({k.name for k in api_keys})
        self.shed_load = shed_load
        self.retry_after_s = retry_after_s
        self.admission.reset_limit()

    def authenticate(self, headers: dict[str, str]) -> ApiKey | None:
        """The request's key; None when no key is configured (the API is open). Raises 401."""
        if not self.keys:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise Unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
                field="Authorization", headers={"WWW-Authenticate": 'Bearer realm="deskgen"'},
            )  # fmt: skip
        key = self.keys.lookup(presented)
        if key is None:
            raise Unauthorized(
                "`Authorization`: the API key is not valid (unknown or revoked).", field="Authorization",
                headers={"WWW-Authenticate": 'Bearer realm="deskgen", error="invalid_token"'},
            )  # fmt: skip
        return key

    def ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh_topology()
                self.topology_error = None
            except Exception as exc:  # the controller is restarting: keep the last known shape
                if self.topology_error is None:
                    log.warning("admission: cannot read the deployments' shape: %r", exc)
                self.topology_error = repr(exc)
            await asyncio.sleep(TOPOLOGY_REFRESH_S)

    async def refresh_topology(self) -> None:
        """Read the generator's running replicas and queue limits and the ingress's running replicas from
        the Serve controller (what the dashboard shows)."""
        import ray
        from ray import serve
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        app = serve.get_replica_context().app_name
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        details = await controller.get_serve_instance_details.remote()
        deployments = details["applications"][app]["deployments"]
        generator, ingress = deployments[GENERATOR], deployments[INGRESS]
        config = generator["deployment_config"]
        self.admission.set_topology(
            generator_replicas=running(generator), max_ongoing=int(config["max_ongoing_requests"]),
            max_queued=int(config.get("max_queued_requests", -1)), ingress_replicas=running(ingress),
        )  # fmt: skip
        self.quotas.set_replicas(running(ingress))


def running(deployment: dict[str, Any]) -> int:
    return sum(1 for r in deployment.get("replicas", []) if r.get("state") == "RUNNING")


#: One door per ingress replica process (Serve runs one replica per process).
door = Door()


class AccessMiddleware:
    """Refuses with 401/429/503 before the route runs; adds ``RateLimit-*`` to the answers of limited keys."""

    def __init__(self, app: Any, routes: list[Any]) -> None:
        self.app = app
        self.routes = routes  # the app's routes: a refusal is labelled with its route in the metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        door.ensure_polling()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        generation = (scope["method"], path) in GENERATION_ROUTES
        key: ApiKey | None = None
        rate_headers: dict[str, str] = {}
        admitted = False
        try:
            key = door.authenticate(headers)
            scope.setdefault("state", {})["api_key"] = key.name if key is not None else None
            if key is not None:
                busy_s = door.admission.retry_after_s(door.retry_after_s)
                verdict = door.quotas.admit(key.name, key, time.monotonic(), generation=generation, busy_retry_s=busy_s)
                rate_headers = verdict.headers
                if verdict.code is not None:
                    kind = ConcurrencyLimited if verdict.code == "concurrency_limited" else RateLimited
                    raise kind(_limit_message(verdict.code, key), retry_after_s=verdict.retry_after_s,
                               headers=rate_headers | {"Retry-After": str(verdict.retry_after_s)})  # fmt: skip
            if generation and door.shed_load:
                admitted = door.admission.try_enter()
                if not admitted:
                    if key is not None:
                        door.quotas.give_back(key.name)
                        door.quotas.release(key.name)
                        key = None
                    wait = door.admission.take_turn(door.retry_after_s, time.monotonic())
                    raise Overloaded(
                        "deskgen is at capacity: retry after Retry-After seconds.", retry_after_s=wait,
                        headers=rate_headers | {"Retry-After": str(wait)},
                    )  # fmt: skip
        except DeskgenError as exc:
            await self.refuse(scope, receive, send, exc)
            return

        status = [0]

        async def send_with_limits(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                if rate_headers:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      *((k.lower().encode(), v.encode()) for k, v in rate_headers.items())]}  # fmt: skip
            await send(message)

        door.generations_in_flight += generation
        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            door.generations_in_flight -= generation
            if admitted:
                door.admission.leave(status[0], time.monotonic())
            if key is not None and generation:
                door.quotas.release(key.name)

    async def refuse(self, scope: Any, receive: Any, send: Any, exc: DeskgenError) -> None:
        """Answer a refusal as JSON (the body is drained, bounded, unparsed), counted under its route."""
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                scope["route"] = route
                break
        request = Request(scope, receive)
        await drain(request, MAX_DRAIN_BYTES)
        status, body, headers = error_for(exc, door.retry_after_s)
        metrics.request_error(metrics.route_of(scope), status, body["error"]["code"])
        body["request_id"] = request_id_of(request)
        await error_response(status, body, headers)(scope, receive, send)


def api_key_of(request: Request) -> str | None:
    """The name of the API key the request was admitted with (``None``: the API is open)."""
    state = request.scope.get("state") or {}
    return state.get("api_key")  # type: ignore[no-any-return]


def _limit_message(code: str, key: ApiKey) -> str:
    if code == "concurrency_limited":
        return f"API key {key.name!r} already has {key.max_concurrent} generation(s) in flight: retry after Retry-After seconds."
    return f"API key {key.name!r} is over its limit of {key.requests_per_minute:g} requests per minute: retry after Retry-After seconds."
