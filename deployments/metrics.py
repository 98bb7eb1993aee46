"""deskgen's application metrics, in one place: names, help, labels and buckets.

Defined with ``ray.serve.metrics`` and exported by Ray's metrics agent on each node's
``metrics_export_port`` (``make serve``: 8080) as ``ray_<name>`` (counters ``ray_<name>_total``, histograms
``ray_<name>_bucket|_sum|_count``), with Serve's own ``deployment``, ``replica`` and ``application`` labels
added. ``observability/grafana-dashboard.json`` queries exactly these names; the observability test tier
evaluates every one of its queries against a real Prometheus.

**Label cardinality is bounded** (every label value comes from a fixed or configured set):

- ``mix``: a named mix keeps its name (the configured catalogue: a handful); the base model is ``base``;
  every ad-hoc mix (``ott:0.3+3d:1.2``: unbounded) shares ``adhoc`` — per-mix panels then show the named
  mixes the A/B test compares, and the ad-hoc traffic as one line;
- ``route``: the route templates of the API (``/v1/experiments/{experiment_id}``, never an id);
  ``status`` an HTTP status; ``code`` an error code of :mod:`deskgen.errors` or of the ingress;
- ``experiment`` (one per split/salt deployed), ``arm`` (a named mix), ``outcome`` (``ok`` or an error
  code), ``event`` (like/dislike/download/select).

Request ids, user ids and prompts never become labels; they are in the logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from deskgen.mixes import BASE_MIX_ID

#: Where Ray's metrics agent serves Prometheus on every node (``make serve``, the rendered cluster configs,
#: ``observability/prometheus.yml``; a unit test keeps them equal).
METRICS_EXPORT_PORT = 8080

#: The label of every mix that is not a named one.
ADHOC = "adhoc"

# Buckets per stage, in seconds: each spans the stage's range from tiny models on a CPU to full size on a GPU.
GATE_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
CAPTION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
DENOISE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]
DECODE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]
PNG_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5]
REQUEST_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
LOAD_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
QUEUE_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
SCORE_BUCKETS = [0.05 * i for i in range(1, 20)]
HOLD_BUCKETS = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05]
BATCH_BUCKETS = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]


def mix_label(mix_id: str, named: Mapping[str, str]) -> str:
    """The ``mix`` label of a canonical mix id: its name when ``named`` (id -> name) has it, ``base`` for
    the base model, else ``adhoc``."""
    if mix_id in ("", BASE_MIX_ID):
        return BASE_MIX_ID
    return named.get(mix_id, ADHOC)


class _Metrics:
    """Creates the metrics on first use, in the replica's process (Ray metrics are per process)."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}

    def _get(self, kind: str, name: str, description: str, tags: tuple[str, ...], boundaries: list[float] | None = None) -> Any:
        metric = self._made.get(name)
        if metric is None:
            from ray.serve import metrics

            keys: Any = tags  # Ray annotates tag_keys as a 1-tuple
            if kind == "counter":
                metric = metrics.Counter(name, description, tag_keys=keys)
            elif kind == "gauge":
                metric = metrics.Gauge(name, description, tag_keys=keys)
            else:
                metric = metrics.Histogram(name, description, boundaries=list(boundaries or []), tag_keys=keys)
            self._made[name] = metric
        return metric

    def count(self, name: str, description: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        self._get("counter", name, description, tuple(tags)).inc(value, tags=dict(tags))

    def observe(self, name: str, description: str, boundaries: list[float], tags: Mapping[str, str], value: float) -> None:
        self._get("histogram", name, description, tuple(tags), boundaries).observe(value, tags=dict(tags))

    def set(self, name: str, description: str, tags: Mapping[str, str], value: float) -> None:
        self._get("gauge", name, description, tuple(tags)).set(value, tags=dict(tags))


_metrics = _Metrics()


# -- the ingress -------------------------------------------------------------------------------------


def route_of(scope: Mapping[str, Any]) -> str:
    """The route template a request matched (``/v1/experiments/{experiment_id}``), ``other`` if none."""
    return str(getattr(scope.get("route"), "path", None) or "other")


class RequestMetricsMiddleware:
    """ASGI middleware: every HTTP request's route, status and latency (a stream's until its last byte).
    A request that raised before answering counts as 500, one whose client left first as 499."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_note(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if status[0] == 500:  # nothing answered yet: the client went away (nginx's 499)
                status[0] = 499
            raise
        finally:
            request_done(route_of(scope), status[0], time.perf_counter() - started)



def request_done(route: str, status: int, seconds: float) -> None:
    _metrics.count("deskgen_requests", "HTTP requests answered, by route and status", {"route": route, "status": str(status)})
    _metrics.observe("deskgen_request_seconds", "HTTP request latency at the ingress, by route", REQUEST_BUCKETS,
                     {"route": route}, seconds)  # fmt: skip


def request_error(route: str, status: int, code: str) -> None:
    """An error answer: 4xx by code, 503 by reason (``overloaded``, ``unavailable``, ``recorder_backlog``,
    ``recorder_unavailable``), 504 ``timeout``."""
    _metrics.count("deskgen_errors", "error answers by route, status and error code",
                   {"route": route, "status": str(status), "code": code})  # fmt: skip


def stage_seconds(stage: str, seconds: float) -> None:
    """The gate, caption and locate stages as the ingress waits for them."""
    if stage == "gate":
        _metrics.observe("deskgen_gate_seconds", "desk gate (classifier) latency seen by the ingress", GATE_BUCKETS, {}, seconds)
    elif stage == "locate":
        _metrics.observe("deskgen_locate_seconds", "product location latency seen by the ingress", CAPTION_BUCKETS, {}, seconds)
    else:
        _metrics.observe("deskgen_caption_seconds", "captioning latency seen by the ingress", CAPTION_BUCKETS, {}, seconds)


def located(status: str) -> None:
    """One answer's product location outcome: ok, off, failed or timeout."""
    _metrics.count("deskgen_locate", "product location outcomes of delivered images", {"status": status})


def exposure(experiment: str, arm: str | None, outcome: str) -> None:
    _metrics.count("deskgen_exposures", "A/B exposures recorded, by experiment, arm and outcome",
                   {"experiment": experiment, "arm": arm or "none", "outcome": outcome})  # fmt: skip


def feedback(experiment: str, arm: str | None, event: str) -> None:
    _metrics.count("deskgen_feedback", "feedback events stored (retries not counted), by experiment, arm and event",
                   {"experiment": experiment, "arm": arm or "none", "event": event})  # fmt: skip


def exposure_commit_timeout() -> None:
    _metrics.count("deskgen_exposure_commit_timeouts", "images delivered before their exposure was committed "
                   "(the experiment store did not answer within exposure_commit_wait_s)", {})  # fmt: skip


def exposure_buffer(pending: int) -> None:
    _metrics.set("deskgen_exposure_buffer_pending", "exposures waiting in the ingress for the experiment store", {}, pending)


# -- the classifier and captioner --------------------------------------------------------------------


def gate_scores(scores: list[float], threshold: float) -> None:
    for score in scores:
        _metrics.observe("deskgen_gate_score", "desk gate scores", SCORE_BUCKETS, {}, score)
        if score < threshold:
            _metrics.count("deskgen_gate_rejections", "photos the gate refused (422)", {})


def batch_size(stage: str, size: int) -> None:
    _metrics.observe("deskgen_batch_size", "images per forward pass, by stage", BATCH_BUCKETS, {"stage": stage}, size)


# -- the generator -----------------------------------------------------------------------------------


def router_held(outcome: str, seconds: float) -> None:
    """A Generator request the mix-aware router held within its spill grace (deployments/routing.py), in the
    caller's process: ``stayed`` (a holder of its mix took it: the counts had lagged a finished request) or
    ``spilled`` (a replica without the mix took it too once the grace passed)."""
    _metrics.observe("deskgen_router_hold_seconds", "Generator requests held by the mix-aware router within its "
                     "spill grace, by outcome (stayed: a holder took it; spilled)", HOLD_BUCKETS,
                     {"outcome": outcome}, seconds)  # fmt: skip


def router_refused(outcome: str) -> None:
    """The Generator's router refused a generation (Serve's BackPressureError): ``retried`` after a pause,
    or ``answered`` 503 (the last pause passed, or the request's deadline would have)."""
    _metrics.count("deskgen_generator_refusals", "generations the Generator's router refused, by outcome "
                   "(retried after a pause; answered 503)", {"outcome": outcome})  # fmt: skip


class GeneratorObserver:
    """What a generator replica reports about its mix cache and generations (``mix`` is the request's
    metrics label). This base ignores everything (Ray-free use); :class:`GeneratorMetrics` exports it."""

    def queued(self, mix: str, seconds: float) -> None: ...
    def inflight(self, n: int) -> None: ...
    def loaded(self, mix: str, seconds: float) -> None: ...
    def evicted(self, mix: str) -> None: ...
    def activated(self, mix: str, switched: bool) -> None: ...
    def generated(self, mix: str, timings: Mapping[str, float]) -> None: ...
    def cancelled(self, mix: str) -> None: ...
    def waiting(self, mix: str, n: int) -> None: ...
    def active(self, mix: str, previous: str | None) -> None: ...


class GeneratorMetrics(GeneratorObserver):
    """The observer of a Serve replica: every event of its mix cache and generations, labelled by mix."""

    def queued(self, mix: str, seconds: float) -> None:
        _metrics.observe("deskgen_generator_queue_seconds", "wait for the replica's one pipeline, by mix",
                         QUEUE_BUCKETS, {"mix": mix}, seconds)  # fmt: skip

    def inflight(self, n: int) -> None:
        _metrics.set("deskgen_generator_inflight", "generations running or waiting on this replica", {}, n)

    def loaded(self, mix: str, seconds: float) -> None:
        _metrics.count("deskgen_mix_loads", "mixes loaded into a replica's cache (multiplexed model loads), by mix", {"mix": mix})
        _metrics.observe("deskgen_adapter_load_seconds", "time to load a mix's adapters, by mix", LOAD_BUCKETS, {"mix": mix}, seconds)

    def evicted(self, mix: str) -> None:
        _metrics.count("deskgen_mix_evictions", "mixes evicted from a replica's cache, by mix", {"mix": mix})

    def waiting(self, mix: str, n: int) -> None:
        _metrics.set("deskgen_generator_mix_queue", "requests waiting for this replica's pipeline, by mix", {"mix": mix}, n)

    def active(self, mix: str, previous: str | None) -> None:
        if previous is not None and previous != mix:
            _metrics.set("deskgen_generator_active_mix", "1 for the mix active (fused) on this replica, by mix", {"mix": previous}, 0)
        _metrics.set("deskgen_generator_active_mix", "1 for the mix active (fused) on this replica, by mix", {"mix": mix}, 1)

    def activated(self, mix: str, switched: bool) -> None:
        _metrics.count("deskgen_mix_activations", "mix activations (one per generation), by mix", {"mix": mix})
        if switched:
            _metrics.count("deskgen_mix_switches", "activations that changed the pipeline's mix, by the new mix", {"mix": mix})

    def generated(self, mix: str, timings: Mapping[str, float]) -> None:
        tags = {"mix": mix}
        _metrics.observe("deskgen_denoise_seconds", "text encoding + denoising, by mix", DENOISE_BUCKETS, tags, timings["denoise_s"])
        _metrics.observe("deskgen_vae_decode_seconds", "VAE decode, by mix", DECODE_BUCKETS, tags, timings["decode_s"])
        _metrics.observe("deskgen_png_encode_seconds", "PNG encoding, by mix", PNG_BUCKETS, tags, timings["png_s"])

    def cancelled(self, mix: str) -> None:
        _metrics.count("deskgen_generations_cancelled", "generations stopped because their caller left, by mix", {"mix": mix})

    def base_loaded(self) -> None:
        _metrics.count("deskgen_base_loads", "base SDXL pipelines loaded (one per replica start)", {})
