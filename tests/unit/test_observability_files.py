"""The observability files stay in step with the code: the committed dashboard is the generator's output,
and every place that names Ray's metrics export port names the same one."""

from __future__ import annotations

import re

import pytest
import yaml

from deployments.metrics import METRICS_EXPORT_PORT
from deskgen.paths import PROJECT_ROOT
from observability import dashboard

pytestmark = pytest.mark.unit


def test_the_committed_dashboard_is_the_generated_one() -> None:
    assert dashboard.DASHBOARD_JSON.read_text() == dashboard.render(), "run python -m observability.dashboard"


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    source = (PROJECT_ROOT / "deployments" / "metrics.py").read_text()
    ours = set(re.findall(r'"(deskgen_[a-z_]+)"', source))
    for expr in dashboard.expressions():
        for metric in re.findall(r"ray_(deskgen_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b", expr):
            assert metric in ours, f"{metric} in {expr!r} is not defined in deployments/metrics.py"


def test_one_metrics_port_everywhere() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert f"METRICS_PORT ?= {METRICS_EXPORT_PORT}" in makefile
    scrape = yaml.safe_load((PROJECT_ROOT / "observability" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_EXPORT_PORT}"]
    for rendered in ("kuberay-rayservice.yaml", "aws-cluster.yaml"):
        text = (PROJECT_ROOT / "cluster" / rendered).read_text()
        assert re.search(rf"metrics-export-port[=:] ?['\"]?{METRICS_EXPORT_PORT}", text), rendered
