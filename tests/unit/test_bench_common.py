"""The benches' shared statistics (bench/common.py), checked against what they promise."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from bench.common import metric_total, p50_difference, percentile, ray_processes

pytestmark = pytest.mark.unit


def test_the_p50_difference_is_the_nearest_rank_p50s_relative_to_the_smaller() -> None:
    a = [0.30, 0.10, 0.20, 0.40]  # even counts: nearest rank takes the lower middle value, no interpolation
    b = [0.26, 0.22, 0.50, 0.21, 0.23, 0.90]
    expected = (percentile(b, 50) - percentile(a, 50)) / min(percentile(a, 50), percentile(b, 50))
    assert (percentile(a, 50), percentile(b, 50)) == (0.20, 0.23)
    assert p50_difference(a, b).point == pytest.approx(expected)  # +15 %
    assert p50_difference(b, a).point == pytest.approx(-expected)  # signed, same magnitude


def test_the_interval_covers_the_true_difference_as_often_as_its_level_says() -> None:
    # Latencies as the router bench sees them (log-normal, a 30 % spread), the control twice as frequent as
    # the other arm; true medians 250 and 260 ms, so the true difference is +4 %.
    rng = np.random.default_rng(7)
    true = (0.26 - 0.25) / 0.25
    reps, hits = 400, 0
    for i in range(reps):
        control, other = rng.lognormal(np.log(0.25), 0.3, 200), rng.lognormal(np.log(0.26), 0.3, 100)
        interval = p50_difference(control, other, resamples=1000, seed=i)
        assert interval.low <= interval.point <= interval.high
        hits += interval.low <= true <= interval.high
    # 95 % nominal; 400 replications put 3 binomial standard errors at +-3.3 points.
    assert 0.917 <= hits / reps <= 0.983


def test_a_lower_level_gives_a_narrower_interval_from_the_same_resamples() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(np.log(0.25), 0.3, 150), rng.lognormal(np.log(0.25), 0.3, 150)
    wide, narrow = p50_difference(a, b, level=0.95), p50_difference(a, b, level=0.5)
    assert wide.low < narrow.low < narrow.high < wide.high
    assert (wide.level, narrow.level) == (0.95, 0.5)


def test_metric_total_sums_the_series_whose_labels_match() -> None:
    text = """# HELP ray_deskgen_generator_refusals_total refusals
# TYPE ray_deskgen_generator_refusals_total counter
ray_deskgen_generator_refusals_total{replica="a",outcome="retried"} 3.0
ray_deskgen_generator_refusals_total{replica="b",outcome="retried"} 2.0
ray_deskgen_generator_refusals_total{replica="a",outcome="answered"} 1.0
"""
    assert metric_total(text, "ray_deskgen_generator_refusals_total", {"outcome": "retried"}) == 5.0
    assert metric_total(text, "ray_deskgen_generator_refusals_total", {}) == 6.0
    assert metric_total(text, "ray_deskgen_generator_refusals_total", {"outcome": "lost"}) == 0.0
    assert metric_total("", "ray_deskgen_generator_refusals_total", {"outcome": "retried"}) == 0.0


def test_ray_processes_are_found_by_their_title_and_this_process_only_when_asked() -> None:
    # A process titled as Ray titles its workers, and one that is not.
    titled = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ray::ServeReplica:deskgen:Probe"])
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "plain"])
    try:
        found = {p.pid: p for p in ray_processes()}
        assert "ray::ServeReplica:deskgen:Probe" in found[titled.pid].cmdline
        assert found[titled.pid].cpu_s is not None and found[titled.pid].cpu_s >= 0
        if "ray" not in sys.executable:  # a checkout's path could hold the word
            assert plain.pid not in found
        assert os.getpid() in {p.pid for p in ray_processes(with_self=True)}
    finally:
        for child in (titled, plain):
            child.kill()
            child.wait()
