"""The Grafana dashboard of deskgen, written as data: ``python -m observability.dashboard`` writes
``observability/grafana-dashboard.json`` (importable as is: Dashboards > New > Import, pick the Prometheus
data source). The observability test tier evaluates every PromQL expression of that file against a real
Prometheus scraping the app, and a unit test fails when the committed file is not this module's output.

Metric names are those of ``deployments/metrics.py`` as Ray exports them (``ray_`` prefix, counters
``_total``), plus Serve's own ``ray_serve_*``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_JSON = Path(__file__).resolve().parent / "grafana-dashboard.json"
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Panel:
    title: str
    #: (PromQL, legend) pairs.
    targets: list[tuple[str, str]]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    #: What a deployment needs before the panel can show data ("" = any deployment, even ``make serve``'s).
    #: The observability test tier (one Generator replica) requires data from every other panel; the
    #: cluster tier (two) from the mix-aware router's hold panels.
    needs: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(metric: str, by: str = "", window: str = "5m") -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, optionally per label ``by``."""
    group = f"le, {by}" if by else "le"
    legend = f"p{{q}} {{{{{by}}}}}" if by else "p{q}"
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate(ray_{metric}_bucket[{window}])))",
         legend.format(q=int(q * 100)))
        for q in QUANTILES
    ]  # fmt: skip


ROWS = [
    Row("Traffic", [
        Panel("Requests per second by route", [("sum by (route) (rate(ray_deskgen_requests_total[1m]))", "{{route}}")], "reqps",
              "Every HTTP answer of the ingress. Rising with flat latency: fine; with rising latency: see the stage rows."),
        Panel("Request latency by route", quantiles("deskgen_request_seconds", "route"), "s",
              "At the ingress, whole request (an SSE stream until its last event)."),
        Panel("Errors per second by status and code", [("sum by (status, code) (rate(ray_deskgen_errors_total[1m]))", "{{status}} {{code}}")], "reqps",
              "503 overloaded: add Generator replicas; 503 unavailable: a replica died (Serve replaces it); "
              "503 recorder_backlog: the experiment store is down; 504: deadlines too tight or GPUs saturated; 4xx: clients."),
    ]),
    Row("Stages", [
        Panel("Desk gate (classifier) latency", quantiles("deskgen_gate_seconds"), "s",
              "Seen by the ingress. p95 up while Classifier replicas are at max: raise Classifier max_replicas."),
        Panel("Captioning latency", quantiles("deskgen_caption_seconds"), "s",
              "Seen by the ingress. Rising: add Captioner replicas (0.25 GPU each)."),
        Panel("Text encoding + denoising by mix", quantiles("deskgen_denoise_seconds", "mix"), "s",
              "Per mix: every mix runs fused (fuse_active_mix); with hot-swap slots only fuse_hot_mix is, and the other mixes are slower."),
        Panel("VAE decode by mix", quantiles("deskgen_vae_decode_seconds", "mix"), "s"),
        Panel("PNG encode by mix", quantiles("deskgen_png_encode_seconds", "mix"), "s"),
        Panel("Batch size by stage (p50)", [("histogram_quantile(0.5, sum by (le, stage) (rate(ray_deskgen_batch_size_bucket[5m])))", "{{stage}}")],
              "short", "Images per forward pass of the classifier, captioner and locator: near 1 under load means batching is not engaging."),
        Panel("Product location latency", quantiles("deskgen_locate_seconds"), "s",
              "Seen by the ingress after each generation. Near locate_timeout_s: add Locator replicas (0.25 GPU each)."),
        Panel("Product location outcomes per second", [("sum by (status) (rate(ray_deskgen_locate_total[5m]))", "{{status}}")], "ops",
              "failed / timeout: images went out without products (the Locator is down or too slow)."),
    ]),
    Row("Mixes", [
        Panel("Mix switches per second by mix", [("sum by (mix) (rate(ray_deskgen_mix_switches_total[5m]))", "{{mix}}")], "ops",
              "Activations that changed a pipeline's mix. High: more hot mixes than replicas; raise Generator min_replicas."),
        Panel("Mix loads and evictions per second", [
            ("sum by (mix) (rate(ray_deskgen_mix_loads_total[5m]))", "load {{mix}}"),
            ("sum by (mix) (rate(ray_deskgen_mix_evictions_total[5m]))", "evict {{mix}}"),
        ], "ops", "Evictions that keep coming: more distinct mixes than replicas x args.generator_cache.mixes."),
        Panel("Adapter load time by mix (p95)", quantiles("deskgen_adapter_load_seconds", "mix")[1:2], "s"),
        Panel("Multiplexed cache hit rate", [(
            "1 - sum(rate(ray_serve_multiplexed_models_load_counter_total[5m])) "
            "/ sum(rate(ray_serve_multiplexed_get_model_requests_counter_total[5m]))", "hit rate")], "percentunit",
              "1 - loads / get_model requests, as Ray's Serve dashboard computes it. Below ~0.9: add Generator replicas."),
        Panel("Activations per second by mix", [("sum by (mix) (rate(ray_deskgen_mix_activations_total[5m]))", "{{mix}}")], "ops",
              "One per generation: the traffic of each mix."),
    ]),
    Row("Queues", [
        Panel("Generations in flight per replica", [("sum by (replica) (ray_deskgen_generator_inflight)", "{{replica}}")], "short",
              "Running + waiting on each Generator replica. Above 1 for minutes: add Generator replicas."),
        Panel("Generator queue wait by mix (p95)", quantiles("deskgen_generator_queue_seconds", "mix")[1:2], "s"),
        Panel("Requests waiting per mix", [("sum by (mix) (ray_deskgen_generator_mix_queue)", "{{mix}}")], "short",
              "Waiting for a Generator replica's pipeline, by mix (all replicas). One mix rising while the others stay "
              "near 0: a hot mix; the mix-aware router spills it to idle replicas (request_router_kwargs.spill_queue)."),
        Panel("Active mix per replica", [("max by (replica, mix) (ray_deskgen_generator_active_mix) > 0", "{{replica}}: {{mix}}")],
              "short", "The mix each Generator replica ran last (its fused mix). The mix-aware router sends a mix's "
              "requests to the replicas shown with it first."),
        Panel("Generations the Generator's router refused per second", [
            ("sum by (outcome) (rate(ray_deskgen_generator_refusals_total[5m]))", "{{outcome}}")], "ops",
              "Serve's router refused a generation (its queue at max_queued_requests). retried: sent again after a "
              "pause (Ingress router_retry_s); answered: the last refusal, a 503 overloaded. answered rising while "
              "generations wait little: bursts overflow the queue before a replica accepts them (raise "
              "Generator max_queued_requests); with long waits: add Generator replicas."),
        Panel("Requests held by the mix-aware router per second", [
            ("sum by (outcome) (rate(ray_deskgen_router_hold_seconds_count[5m]))", "{{outcome}}")], "ops",
              "A hot mix's request held within spill_grace_s before an idle replica without the mix may take it. "
              "stayed: a holder took it after all (its count lagged a finished request); spilled: another "
              "replica loaded the mix. Many spilled: more hot mixes than replicas.",
              needs="two or more Generator replicas (a request is held only when another replica could take it)"),
        Panel("Hold time in the mix-aware router (p95)", quantiles("deskgen_router_hold_seconds", "outcome")[1:2], "s",
              "Near spill_grace_s for spilled requests; stayed requests leave as soon as their holder's count drops.",
              needs="two or more Generator replicas (a request is held only when another replica could take it)"),
        Panel("Requests queued in Serve by deployment", [("sum by (deployment) (ray_serve_deployment_queued_queries)", "{{deployment}}")], "short",
              "Waiting for a replica slot (max_queued_requests turns them into 503s)."),
        Panel("Cancelled generations per second by mix", [("sum by (mix) (rate(ray_deskgen_generations_cancelled_total[5m]))", "{{mix}}")], "ops",
              "The caller left or its deadline passed: GPU time spent for nothing."),
        Panel("Base pipeline loads", [("sum(ray_deskgen_base_loads_total)", "loads")], "short",
              "One per Generator replica start; rising without scaling: replicas crash."),
    ]),
    Row("Desk gate", [
        Panel("Gate rejection rate", [(
            "sum(rate(ray_deskgen_gate_rejections_total[5m])) / sum(rate(ray_deskgen_gate_score_count[5m]))", "rejected")],
              "percentunit", "Share of photos refused with 422. A jump: a client sends the wrong photos, or the threshold changed."),
        Panel("Gate score distribution", [("sum by (le) (rate(ray_deskgen_gate_score_bucket[5m]))", "{{le}}")], "short",
              "Scores pile up near the threshold: the gate is unsure; retrain or move the threshold."),
    ]),
    Row("A/B experiment", [
        Panel("Exposures per second by arm and outcome", [
            ("sum by (experiment, arm, outcome) (rate(ray_deskgen_exposures_total[5m]))", "{{arm}} {{outcome}}")], "ops"),
        Panel("Feedback per second by arm and event", [
            ("sum by (arm, event) (rate(ray_deskgen_feedback_total[5m]))", "{{arm}} {{event}}")], "ops"),
        Panel("Like rate by arm (feedback / delivered images, 1 h)", [(
            'sum by (arm) (increase(ray_deskgen_feedback_total{event="like"}[1h])) '
            '/ sum by (arm) (increase(ray_deskgen_exposures_total{outcome="ok"}[1h]))', "{{arm}}")], "percentunit",
              "A live view only; the report (GET /v1/experiments/{id}) has the per-user estimate with its interval."),
        Panel("Exposures waiting for the experiment store", [("sum(ray_deskgen_exposure_buffer_pending)", "pending")], "short",
              "Rising: the Recorder or its database is down or slow; at exposure_buffer, generation answers 503."),
    ]),
]  # fmt: skip


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, in panel order."""
    return [expr for row in ROWS for panel in row.panels for expr, _ in panel.targets]


def needing_more() -> dict[str, str]:
    """The expressions of panels that show data only in a larger deployment, with what they need."""
    return {expr: panel.needs for row in ROWS for panel in row.panels if panel.needs for expr, _ in panel.targets}


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row in ROWS:
        panels.append({"type": "row", "title": row.title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row.panels):
            panels.append({
                "type": panel.kind,
                "title": panel.title,
                "description": " ".join(filter(None, [panel.description, panel.needs and f"Data only with {panel.needs}."])),
                "id": next_id,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                "targets": [
                    {"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for k, (expr, legend) in enumerate(panel.targets)
                ],
            })  # fmt: skip
            next_id += 1
        y += 8 * ((len(row.panels) + 2) // 3)
    return {
        "title": "deskgen",
        "uid": "deskgen",
        "description": "deskgen: traffic, stage latencies, LoRA mixes, queues, the desk gate and the A/B test.",
        "tags": ["deskgen", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
            "current": {}, "hide": 0, "refresh": 1,
        }]},
        "panels": panels,
    }  # fmt: skip


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    if "--check" in sys.argv:
        if DASHBOARD_JSON.read_text() != render():
            sys.exit(f"{DASHBOARD_JSON} is stale: run python -m observability.dashboard")
        return
    DASHBOARD_JSON.write_text(render())
    print(f"wrote {DASHBOARD_JSON.relative_to(Path.cwd()) if DASHBOARD_JSON.is_relative_to(Path.cwd()) else DASHBOARD_JSON}")


if __name__ == "__main__":
    main()
