"""The observability tier: the serve tier's app, scraped by a real Prometheus on Ray's metrics export port.

Traffic that touches every stage, mix event and error class goes in; then every PromQL expression of
``observability/grafana-dashboard.json`` must return data from that Prometheus (a query naming a metric
nobody exports returns nothing and fails), the per-mix series must move by exactly the traffic sent, and
every stage's log must carry the request id.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from deskgen.mixes import NAMED_MIXES, Mix
from observability.dashboard import DASHBOARD_JSON, needing_more
from tests.prometheus import SCRAPE_S, Prometheus, running_prometheus

from .conftest import APP, generator_info
from .helpers import assert_error, door, generate, refused_job_image, text2img

pytestmark = pytest.mark.observability

#: The labels a printed series is told apart by.
LEGEND = {"route", "status", "code", "mix", "stage", "arm", "event", "outcome", "deployment", "le"}
#: How long Prometheus may take to show what was sent: Ray reports every second here, Prometheus scrapes
#: every SCRAPE_S s (tests/prometheus.py), and rate() needs two samples; generous for a loaded CI machine,
#: never a speed claim.
SETTLE_S = 90.0

T = TypeVar("T")


@pytest.fixture(scope="module")
def prometheus(serve_app: dict[str, Any]) -> Iterator[Prometheus]:
    with running_prometheus([f"127.0.0.1:{serve_app['metrics_port']}"]) as prom:
        try:
            wait_until(prom.targets_up, "Prometheus never scraped Ray's metrics endpoint")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {prom.targets_health()}") from None
        yield prom


def wait_until(ok: Callable[[], Any], message: str | Callable[[], str], timeout_s: float = SETTLE_S) -> Any:
    """``ok()``'s first truthy result; raises ``message`` (called at the timeout when it is a function, so it
    shows the state that failed, not the state when the wait began)."""
    deadline = time.monotonic() + timeout_s
    while not (result := ok()):
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.5)
    return result


def dashboard_expressions() -> list[str]:
    """Every PromQL expression in the committed dashboard JSON (what ops import)."""
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_returns_data(
    prometheus: Prometheus, client: httpx.Client, desk_photo: bytes, not_a_desk: bytes, serve_app: dict[str, Any]
) -> None:
    # Seven mixes through one Generator replica holding four: loads, switches and evictions.
    for mix in ("dalle_ott", "ott_3d", "mix", "dalle_only", "ott_only", "3d_only", "ott:0.3"):
        assert text2img(client, mix=mix).status_code == 200
    # The full pipeline (gate, captions, batches), a refusal, a client error, a cancelled generation.
    assert generate(client, desk_photo, mix="ott_3d").status_code == 200
    files = {"image": ("d.jpg", desk_photo, "image/jpeg")}
    with ThreadPoolExecutor(4) as pool:  # concurrent photos: the classifier and captioner batch them
        for route in ("/v1/classify", "/v1/caption"):
            assert [r.status_code for r in pool.map(lambda _, r=route: client.post(r, files=files), range(4))] == [200] * 4
    assert_error(generate(client, not_a_desk), 422, "not_a_desk_setup")
    assert_error(text2img(client, steps=0), 400, "invalid_parameter", "steps")
    assert_error(text2img(client, steps=150, width=512, height=512, timeout_s=0.3), 504, "timeout")
    # A generation the Generator's router refuses: sent again after each pause, then answered.
    refused_job_image(client, serve_app["url"], APP)
    # An A/B exposure with feedback.
    delivered = text2img(client, user_id="obs-user", accept="application/json")
    assert delivered.status_code == 200
    assert client.post("/v1/feedback", json={"image_id": delivered.json()["request_id"], "event": "like",
                                             "user_id": "obs-user"}).status_code == 201  # fmt: skip

    assert prometheus.query("sum(rate(ray_deskgen_no_such_metric_total[5m]))") == []  # the check can fail
    expressions = dashboard_expressions()
    assert len(expressions) >= 25
    # Panels that need a larger deployment than this tier's (one Generator replica) must be valid PromQL
    # here; the cluster tier (tests/cluster) checks that they show data.
    larger = needing_more()
    assert set(larger) <= set(expressions) and len(larger) < len(expressions) / 5, larger
    for expr in larger:
        prometheus.query(expr)  # raises on a PromQL error

    # An expression passes once it has returned data (a gauge of a loaded 2-core machine may miss a report
    # and blink out of a scrape; Grafana shows it all the same).
    left: list[str] = [e for e in expressions if e not in larger]
    deadline = time.monotonic() + SETTLE_S
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [e for e in left if not prometheus.query(e)]
    if left:
        exported = httpx.get(f"http://127.0.0.1:{serve_app['metrics_port']}/metrics").text
        names = {m for e in left for m in re.findall(r"ray_deskgen_[a-z_]+", e)}
        lines = [line[:300] for line in exported.splitlines() if any(n in line for n in names)]
        raise AssertionError("dashboard queries without data:\n" + "\n".join(left) + "\nexported:\n" + "\n".join(lines))
    print(f"\n[observability] all {len(expressions) - len(larger)} dashboard queries return data (and {len(larger)} "
          f"that need {sorted(set(larger.values()))} are valid); what each showed:")
    for e in expressions:
        series = prometheus.query(e)
        shown = ", ".join(f"{ {k: v for k, v in s['metric'].items() if k in LEGEND} or ''}={float(s['value'][1]):.4g}"
                          for s in series[:6])  # fmt: skip
        print(f"[observability]   {e}\n[observability]     -> {len(series)} series: {shown}")


def settled(prometheus: Prometheus, counters: Callable[[], T | None], what: str) -> T:
    """``counters()`` once two successful scrapes in a row agree on it: what earlier tests sent is all in
    (``counters`` answers None when Prometheus's latest scrape failed)."""

    def agreed() -> tuple[T] | None:
        first = counters()
        time.sleep(SCRAPE_S + 1)
        second = counters()
        return (second,) if first is not None and first == second else None

    (value,) = wait_until(agreed, lambda: f"{what} never settled: {prometheus.scrape_report()}")
    return value


def test_refusals_count_each_pause_and_the_answer(prometheus: Prometheus, client: httpx.Client,
                                                   serve_app: dict[str, Any]) -> None:  # fmt: skip
    """A job's image asked of a full Generator: its router refuses it, the Ingress sends it again after each
    pause of ``router_retry_s`` and answers the last refusal. The refusals counter in Prometheus moves by
    exactly one ``answered``, and by at least one ``retried`` per pause (the long generations that fill the
    Generator arrive together, and the router may refuse one of them once before it gets in)."""
    pauses = door(client)["router_retry_s"]
    assert pauses, "the tier's Ingress retries refused generations (serve_config.yaml)"

    def counters() -> dict[str, float] | None:
        at = time.time()
        if not prometheus.scraped_at(at):
            return None
        return prometheus.values("sum by (outcome) (ray_deskgen_generator_refusals_total)", "outcome", at)

    before = settled(prometheus, counters, "the refusal counters")
    refused_job_image(client, serve_app["url"], APP)

    def moved() -> dict[str, float] | None:
        now = counters()
        if now is None:
            return None
        delta = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in ("retried", "answered")}
        return delta if delta["answered"] == 1 and delta["retried"] >= len(pauses) else None

    delta = wait_until(moved, lambda: f"the refusal counters did not move by 1 answered and >= {len(pauses)} "
                                      f"retried: before {before}, now {counters()}; {prometheus.scrape_report()}")  # fmt: skip
    print(f"\n[observability] refusals seen in Prometheus: {delta} (pauses {pauses})")


def test_per_mix_series_move_with_the_traffic(prometheus: Prometheus, client: httpx.Client) -> None:
    def counters() -> dict[str, dict[str, float]] | None:
        """The per-mix counters as of Prometheus's latest scrape, or None when that scrape failed: its stale
        markers hide every series, and an empty answer would read as counters that never moved."""
        at = time.time()
        if not prometheus.scraped_at(at):
            return None
        return {name: prometheus.values(f"sum by (mix) (ray_deskgen_mix_{name}_total)", "mix", at)
                for name in ("switches", "activations")}  # fmt: skip

    before = settled(prometheus, counters, "the per-mix counters")
    active = generator_info()["active_mix"]
    sequence = ["ott_3d", "dalle_only"] * 3
    for mix in sequence:
        assert text2img(client, mix=mix).status_code == 200
    ids = {m: Mix.from_weights(NAMED_MIXES[m]).id for m in ("ott_3d", "dalle_only")}
    previous = [active] + [ids[m] for m in sequence[:-1]]
    expected_switches = {m: sum(1 for m2, p in zip(sequence, previous, strict=True) if m2 == m and ids[m] != p) for m in ids}
    expected_activations = {m: sequence.count(m) for m in ids}

    def moved() -> bool:
        now = counters()
        return now is not None and all(
            now[name].get(m, 0) - before[name].get(m, 0) == want[m]
            for name, want in (("switches", expected_switches), ("activations", expected_activations))
            for m in ids
        )

    wait_until(moved, lambda: f"per-mix counters did not move by {expected_switches} switches and "
                              f"{expected_activations} activations: before {before}, now {counters()}; "
                              f"{prometheus.scrape_report()}")  # fmt: skip
    print(f"\n[observability] switches {expected_switches}, activations {expected_activations} seen in Prometheus; "
          f"{prometheus.scrape_report()}")


def test_every_stage_logs_the_request_id(serve_app: dict[str, Any], client: httpx.Client, desk_photo: bytes) -> None:
    import ray

    rid = f"obs-{uuid.uuid4().hex[:12]}"
    response = client.post("/v1/generate", files={"image": ("d.jpg", desk_photo, "image/jpeg")},
                           data={"mix": "ott_3d"}, headers={"X-Request-Id": rid})  # fmt: skip
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

    def stages_with_the_id() -> set[str]:
        found = set()
        for path in logs.glob("replica_deskgen_*.log"):
            stage = path.name.split("_")[2]
            if rid in path.read_text(errors="replace"):
                found.add(stage)
        return found

    wait_until(lambda: stages_with_the_id() >= {"Ingress", "Classifier", "Captioner", "Generator"},
               f"request id {rid} not in every stage's log: found in {stages_with_the_id()}", timeout_s=30)  # fmt: skip
