"""The router bench's bookkeeping (bench/router.py): rounds pooled per router, each round kept for the spread
and compared with Serve's default round by round."""

from __future__ import annotations

import argparse
import collections

import pytest

from bench import router

pytestmark = pytest.mark.unit


def one_round(name: str, waits: list[float], requests: int, wall_s: float) -> dict:
    latencies = {"ott_3d": [1.0, 2.0], "dalle_ott": [1.5]}
    spread = {mix: collections.Counter({"r1": len(v)}) for mix, v in latencies.items()}
    return {"router": name, "requests": requests, "ok": requests, "switches": 10, "loads": 2, "wall_s": wall_s,
            "waits": waits, "latencies": latencies, "spread": spread,
            "rounds": [{"wait_p95": max(waits), "rps": requests / wall_s}]}  # fmt: skip


def test_rounds_are_pooled_and_each_is_kept_in_order_for_the_paired_comparison() -> None:
    runs = router.merged([
        one_round("serve (default)", [0.1, 0.4], 100, 20.0),  # 5 req/s, p95 0.4
        one_round("mix-aware, spill_queue 0", [0.1, 0.3], 100, 25.0),  # lower p95, slower
        one_round("serve (default)", [0.1, 0.2], 100, 25.0),  # 4 req/s, p95 0.2
        one_round("mix-aware, spill_queue 0", [0.1, 0.5], 100, 20.0),  # higher p95, faster
        one_round("serve (default)", [0.1, 0.6], 100, 20.0),
        one_round("mix-aware, spill_queue 0", [0.1, 0.5], 100, 10.0),  # lower p95, faster
    ])  # fmt: skip
    serve, aware = runs
    assert (serve["requests"], serve["switches"], len(serve["waits"])) == (300, 30, 6)
    assert [x["wait_p95"] for x in aware["rounds"]] == [0.3, 0.5, 0.5]
    assert router.paired(runs) == ["mix-aware, spill_queue 0 against serve (default), round by round: a lower wait "
                                   "p95 in 2 of 3 rounds, a higher throughput in 2 of 3."]  # fmt: skip
    args = argparse.Namespace(replicas=3, rounds=3, requests=100, clients=4, zipf=1.1, seed=7)
    main = router.tables(runs, args)[0]
    assert main.rows[1][-2:] == ["300 / 500 / 500", "4.00 / 5.00 / 10.00"]
    assert main.notes == router.paired(runs)
